"""Many adapters on one base: mixed-adapter batches, weighted combination, hot swap, LRU cache.
References: each row run alone through its adapter; hand-summed weight updates; fresh loads."""

from __future__ import annotations

import pytest
import torch

import deltatune as dt
from deltatune.compose import AdapterCache
from deltatune.core import routing
from tests.methods.contract import TOYS, logits, one_by_one, perturbed, repeated_rows

NAMES = ["a", "b", "__base__", "b", "a", "__base__"]  # non-contiguous segments on purpose


def two_adapter_model(toy):
    model = dt.attach(toy.base(), dt.LoraConfig(r=4, targets=["q", "v"], init="random"), name="a")
    model.add(dt.LoraConfig(r=2, targets=["q", "v", "o"], init="random"), name="b")
    model.use(["a", "b"])
    perturbed(model)  # also makes the per-adapter classifier copies differ
    return model.eval()


def rows_of(toy, n: int = 3) -> dict:
    return repeated_rows(toy, n)


@pytest.mark.parametrize("gather", [False, True], ids=["segments", "gathered"])
@pytest.mark.parametrize("toy", TOYS.values(), ids=TOYS.keys())
def test_mixed_batch_equals_each_row_alone(toy, gather, monkeypatch):
    model = two_adapter_model(toy)
    batch = rows_of(toy)
    original = routing.RowRouting.__init__
    monkeypatch.setattr(routing.RowRouting, "__init__",
                        lambda self, names, device="cpu", gather_=None: original(self, names, device, gather))
    with torch.no_grad():
        mixed = model(**batch, adapter_names=NAMES).logits
    # float rounding differs (batched matmuls, scale folded into A); a routing error would be O(1)
    torch.testing.assert_close(mixed, one_by_one(model, batch, NAMES), atol=1e-4, rtol=1e-4)
    assert all(layer.routing is None for _, layer in model.adapter_layers())


def test_mixed_batch_gradients_match_single_adapter_training():
    toy = TOYS["llama"]
    model = two_adapter_model(toy)
    model.train()
    batch = rows_of(toy, 2)
    model(**batch, labels=batch["input_ids"], adapter_names=["a"] * 4).loss.backward()
    mixed_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    model.use("a")
    model(**batch, labels=batch["input_ids"]).loss.backward()
    alone = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert set(alone) <= set(mixed_grads)
    for name, grad in alone.items():
        torch.testing.assert_close(mixed_grads[name], grad, atol=1e-6, rtol=1e-5)


def test_mixed_batch_generate_equals_each_row_alone():
    model = two_adapter_model(TOYS["gpt2"])
    prompt = torch.randint(3, 90, (1, 5), generator=torch.Generator().manual_seed(4)).repeat(3, 1)
    names = ["b", dt.BASE_ADAPTER, "a"]
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    mixed = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), adapter_names=names, **kwargs)
    for i, name in enumerate(names):
        row = dict(input_ids=prompt[i:i + 1], attention_mask=torch.ones_like(prompt[i:i + 1]), **kwargs)
        if name == dt.BASE_ADAPTER:
            with model.disabled():
                alone = model.generate(**row)
        else:
            model.use(name)
            alone = model.generate(**row)
        assert torch.equal(mixed[i], alone[0]), name
    assert not torch.equal(mixed[0], mixed[1])  # the adapters really differ


def test_interleaved_rows_are_grouped_and_answered_in_the_callers_order():
    """Distinct rows, interleaved adapters: the batch is sorted by adapter inside and put back."""
    toy = TOYS["llama"]
    model = two_adapter_model(toy)
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(3, 90, (6, 7), generator=g)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    assert routing.grouping_order(NAMES).tolist() == [0, 4, 1, 3, 2, 5]
    with torch.no_grad():
        out = model(**batch, labels=ids, adapter_names=NAMES)
        alone = one_by_one(model, batch, NAMES)
        torch.testing.assert_close(out.logits, alone, atol=1e-4, rtol=1e-4)
        # the loss is a mean over every token of the batch, whatever the row order
        logp = torch.log_softmax(alone[:, :-1], dim=-1).gather(-1, ids[:, 1:, None])
        torch.testing.assert_close(out.loss, -logp.mean(), atol=1e-4, rtol=1e-4)
    prompts = torch.randint(3, 90, (4, 5), generator=g)
    names = ["a", "b", "a", dt.BASE_ADAPTER]
    kwargs = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    mixed = model.generate(input_ids=prompts, attention_mask=torch.ones_like(prompts), adapter_names=names, **kwargs)
    for i, name in enumerate(names):
        row = dict(input_ids=prompts[i:i + 1], attention_mask=torch.ones_like(prompts[i:i + 1]), **kwargs)
        if name == dt.BASE_ADAPTER:
            with model.disabled():
                alone_tokens = model.generate(**row)
        else:
            model.use(name)
            alone_tokens = model.generate(**row)
        assert torch.equal(mixed[i], alone_tokens[0]), (i, name)


def test_mixed_batch_refuses_bad_requests():
    model = two_adapter_model(TOYS["bert"])
    batch = rows_of(TOYS["bert"])
    with pytest.raises(dt.AdapterError, match="no adapter named 'zzz'"):
        model(**batch, adapter_names=["zzz"] * 6)
    with pytest.raises(dt.AdapterError, match="6 rows"):
        model(**batch, adapter_names=["a"] * 5)
    model.merge(["a"])
    with pytest.raises(dt.AdapterError, match="unmerge"):
        model(**batch, adapter_names=NAMES)


def lora_delta(model, name, path):
    return model.base_model.get_submodule(path).delta_weight(name)


@pytest.mark.parametrize("how", ["cat", "svd"])
def test_combine_cat_and_full_rank_svd_are_exact(how):
    model = two_adapter_model(TOYS["llama"])
    weights = {"a": 0.7, "b": -0.5}
    report = model.combine(weights, name="ab", how=how, rank=6)
    assert report.min_energy_kept == pytest.approx(1.0, abs=1e-5)
    for path, layer in model.adapter_layers():
        if "ab" not in layer.adapter_names:
            continue
        expected = sum(w * layer.delta_weight(n) for n, w in weights.items() if n in layer.adapter_names)
        torch.testing.assert_close(layer.delta_weight("ab"), expected, atol=1e-5, rtol=1e-4)
    assert report.ranks["model.layers.0.self_attn.q_proj"] == 6  # 4 + 2
    assert report.ranks["model.layers.0.self_attn.o_proj"] == 2  # only b adapts o


def test_combine_svd_truncation_reports_energy_and_is_the_best_rank_k_fit():
    model = two_adapter_model(TOYS["llama"])
    report = model.combine({"a": 1.0, "b": 1.0}, name="ab1", how="svd", rank=1)
    path = "model.layers.1.self_attn.q_proj"
    layer = model.base_model.get_submodule(path)
    full = layer.delta_weight("a") + layer.delta_weight("b")
    s = torch.linalg.svdvals(full)
    assert report.energy_kept[path] == pytest.approx(float(s[0] ** 2 / (s ** 2).sum()), rel=1e-4)
    assert torch.linalg.matrix_rank(layer.delta_weight("ab1")) == 1
    # Eckart-Young: the error is exactly the discarded singular values
    err = torch.linalg.norm(layer.delta_weight("ab1") - full)
    assert float(err) == pytest.approx(float(s[1:].norm()), rel=1e-3)


def test_combine_linear_follows_its_formula_and_needs_equal_ranks():
    model = dt.attach(TOYS["bert"].base(), dt.LoraConfig(r=2, alpha=4, targets=["q"], init="random"), name="x")
    model.add(dt.LoraConfig(r=2, alpha=2, targets=["q"], init="random"), name="y")
    model.combine({"x": 0.5, "y": 2.0}, name="xy", how="linear")
    layer = model.base_model.bert.encoder.layer[0].attention.self.query
    sx, sy = layer.scaling["x"], layer.scaling["y"]
    a = (0.5 * sx) ** 0.5 * layer.lora_A["x"].weight + (2.0 * sy) ** 0.5 * layer.lora_A["y"].weight
    b = (0.5 * sx) ** 0.5 * layer.lora_B["x"].weight + (2.0 * sy) ** 0.5 * layer.lora_B["y"].weight
    torch.testing.assert_close(layer.delta_weight("xy"), b @ a)
    model.add(dt.LoraConfig(r=3, targets=["q"]), name="z")
    with pytest.raises(dt.AdapterError, match="equal ranks"):
        model.combine({"x": 1.0, "z": 1.0}, name="xz", how="linear")
    with pytest.raises(dt.ConfigError, match="rank"):
        model.combine({"x": 1.0}, name="s", how="svd")


def test_combined_adapter_saves_and_loads_with_its_per_module_ranks(tmp_path):
    toy = TOYS["llama"]
    model = two_adapter_model(toy)
    model.combine({"a": 1.0, "b": 1.0}, name="ab", how="cat")
    model.use("ab")
    expected = logits(model, rows_of(toy, 1))
    model.save(tmp_path, adapter="ab")
    loaded = dt.load(toy.base(), tmp_path).eval()
    torch.testing.assert_close(logits(loaded, rows_of(toy, 1)), expected, atol=1e-6, rtol=0)


def save_adapter(toy, tmp_path, name, r, seed):
    torch.manual_seed(seed)
    model = perturbed(dt.attach(toy.base(), dt.LoraConfig(r=r, alpha=2 * r, targets=["q", "v"], init="random")))
    folder = tmp_path / name
    model.save(folder)
    return folder


@pytest.mark.parametrize("new_rank", [4, 2])
def test_hot_swap_in_place_equals_a_fresh_load(tmp_path, new_rank):
    toy = TOYS["bert"]
    first, second = save_adapter(toy, tmp_path, "first", 4, 1), save_adapter(toy, tmp_path, "second", new_rank, 2)
    serving = dt.load(toy.base(), first, name="live").eval()
    modules_before = {p: id(m) for p, m in serving.base_model.named_modules()}
    params_before = {n: id(p) for n, p in serving.named_parameters()}
    serving.hot_swap("live", second)
    fresh = dt.load(toy.base(), second).eval()
    batch = rows_of(toy, 1)
    torch.testing.assert_close(logits(serving, batch), logits(fresh, batch), atol=1e-5, rtol=1e-5)
    assert {p: id(m) for p, m in serving.base_model.named_modules()} == modules_before
    assert {n: id(p) for n, p in serving.named_parameters()} == params_before


def test_hot_swap_refuses_a_larger_rank_and_changes_nothing(tmp_path):
    toy = TOYS["bert"]
    small, big = save_adapter(toy, tmp_path, "small", 2, 1), save_adapter(toy, tmp_path, "big", 8, 2)
    serving = dt.load(toy.base(), small, name="live").eval()
    before = logits(serving, rows_of(toy, 1))
    with pytest.raises(dt.AdapterFileError, match="rank may only shrink"):
        serving.hot_swap("live", big)
    torch.testing.assert_close(logits(serving, rows_of(toy, 1)), before, atol=0, rtol=0)


def test_adapter_cache_evicts_least_recently_used_but_never_pinned(tmp_path):
    toy = TOYS["bert"]
    folders = {n: save_adapter(toy, tmp_path, n, 2, i) for i, n in enumerate("pqrs")}
    model = dt.load(toy.base(), folders["p"], name="p")
    cache = AdapterCache(model, capacity=2, pinned=("p",))
    assert cache.load("q", folders["q"]) == []
    assert cache.load("r", folders["r"]) == ["q"]  # p is pinned, q is the least recently used
    cache.touch("p")
    assert cache.load("s", folders["s"]) == ["r"]
    assert cache.names() == ["p", "s"] and model.adapter_names == ["p", "s"]
    assert cache.load("s", folders["s"]) == []  # already loaded: just marked as used
    assert (cache.evictions, cache.evicted()) == (2, ["q", "r"])
    assert cache.load("q", folders["q"]) == ["s"]
    assert (cache.evictions, cache.evicted()) == (3, ["r", "s"])  # q is loaded again
