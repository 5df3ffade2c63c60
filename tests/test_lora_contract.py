"""The LoRA contract on the four model families, and the LoRA math against hand-written formulas.

Part 1 runs one table of checks over every (model, target set) case: only adapter parameters
train; save/load, disabled(), merge/unmerge, remove, unload and merge_and_unload all give the
outputs they must (the base model's own, or the unmerged adapter's); counts equal peft's.

Part 2 checks single layers (Linear, GPT-2 Conv1D, Embedding, Conv2d) against the formula
``y = base(x) + s * B(A(x))`` with ``s = alpha / r`` (``alpha / sqrt(r)`` for rsLoRA) and against
peft's layers holding the same weights.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import deltatune as dt
from tests.toy_models import (TOYS, Toy, assert_differs, assert_same, is_head_copy, is_lora_param, layer_zoo,
                              logits, lora_paths, module_types, peft_lora, randomize, zoo_input)

pytestmark = pytest.mark.usefixtures("one_thread")

R, ALPHA = 4, 8


@dataclass(frozen=True)
class Case:
    """One model family with one target selection, in deltatune's words and in peft's."""

    toy: Toy
    dt_kwargs: dict
    peft_kwargs: dict

    def config(self) -> dt.LoraConfig:
        return dt.LoraConfig(r=R, alpha=ALPHA, dropout=0.0, init="random", **self.dt_kwargs)

    def adapted(self) -> dt.AdaptedModel:
        """The toy with a random adapter; a classifier copy is moved away from the base head too."""
        model = dt.attach(self.toy.base(), self.config())
        return randomize(model, only=is_head_copy).eval()


_UPPER = {"targets": ["q", "v", "o", "up", "down"], "layers": "upper"}
CASES = {
    "bert-qv": Case(TOYS["bert"], {"targets": ["q", "v"]}, {"target_modules": ["query", "value"]}),
    "bert-all-linear": Case(TOYS["bert"], {"targets": "all-linear"}, {"target_modules": "all-linear"}),
    "bert-upper": Case(TOYS["bert"], _UPPER, {
        "target_modules": ["query", "value", "attention.output.dense", "intermediate.dense", "output.dense"],
        "layers_to_transform": [2, 3]}),
    "gpt2-qv": Case(TOYS["gpt2"], {"targets": ["q", "v"]}, {"target_modules": ["c_attn"], "fan_in_fan_out": True}),
    "gpt2-all-linear": Case(TOYS["gpt2"], {"targets": "all-linear"},
                            {"target_modules": "all-linear", "fan_in_fan_out": True}),
    "gpt2-upper": Case(TOYS["gpt2"], _UPPER, {"target_modules": ["c_attn", "c_proj", "c_fc"],
                                              "layers_to_transform": [2, 3], "fan_in_fan_out": True}),
    "llama-qv": Case(TOYS["llama"], {"targets": ["q", "v"]}, {"target_modules": ["q_proj", "v_proj"]}),
    "llama-all-linear": Case(TOYS["llama"], {"targets": "all-linear"}, {"target_modules": "all-linear"}),
    "llama-upper": Case(TOYS["llama"], _UPPER, {
        "target_modules": ["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"], "layers_to_transform": [2, 3]}),
    "t5-qv": Case(TOYS["t5"], {"targets": ["q", "v"]}, {"target_modules": ["q", "v"]}),
    "t5-all-linear": Case(TOYS["t5"], {"targets": "all-linear"}, {"target_modules": "all-linear"}),
    # T5 has two stacks of 2 blocks: "upper" is block 1 of the encoder and block 1 of the decoder
    "t5-upper": Case(TOYS["t5"], _UPPER, {"target_modules": ["q", "v", "o", "wi", "wo"],
                                          "layers_to_transform": [1], "layers_pattern": "block"}),
}


@pytest.fixture(params=list(CASES.values()), ids=list(CASES))
def case(request) -> Case:
    return request.param


# --- part 1: the contract table --------------------------------------------------------------

def test_only_adapter_parameters_train_and_get_gradients(case):
    model = case.adapted().train()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    expected = {n for n, _ in model.named_parameters()
                if is_lora_param(n) or (case.toy.peft_task == "SEQ_CLS" and is_head_copy(n))}
    assert any(is_lora_param(n) for n in expected)
    assert trainable == expected
    if case.toy.peft_task == "SEQ_CLS":
        assert any(is_head_copy(n) for n in trainable), "the classifier head does not train"

    model(**case.toy.loss_batch()).loss.backward()
    params = dict(model.named_parameters())
    assert sorted(n for n in trainable if params[n].grad is None) == []
    assert sorted(n for n, p in params.items() if n not in trainable and p.grad is not None) == []


def test_adapter_changes_output_and_disabled_gives_base_output(case):
    batch = case.toy.batch()
    base_out = logits(case.toy.base(), batch)
    model = case.adapted()
    assert_differs(logits(model, batch), base_out)
    with model.disabled():
        assert_same(logits(model, batch), base_out)
    assert_differs(logits(model, batch), base_out)  # and the adapter is back afterwards


def test_save_then_load_on_a_fresh_base_gives_identical_outputs(case, tmp_path):
    batch = case.toy.batch()
    model = case.adapted()
    expected = logits(model, batch)
    model.save(tmp_path)
    loaded = dt.load(case.toy.base(), tmp_path, name="restored")
    assert loaded.active_adapters == ["restored"]
    assert_same(logits(loaded.eval(), batch), expected)
    assert lora_paths(loaded) == lora_paths(model)


def test_merge_matches_unmerged_and_unmerge_restores_the_weights(case):
    batch = case.toy.batch()
    model = case.adapted()
    unmerged = logits(model, batch)
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    model.merge()
    assert model.merged
    assert_same(logits(model, batch), unmerged, atol=1e-4)
    with model.disabled():  # a merged adapter is taken out for disabled() too
        assert_same(logits(model, batch), logits(case.toy.base(), batch), atol=1e-5)
    assert_same(logits(model, batch), unmerged, atol=1e-4)
    model.unmerge()
    assert not model.merged
    assert_same(logits(model, batch), unmerged, atol=1e-5)
    for n, p in model.named_parameters():
        assert_same(p.detach(), weights[n], atol=1e-6)


def test_merging_twice_raises_adapter_error(case):
    model = case.adapted()
    model.merge()
    with pytest.raises(dt.AdapterError, match="already merged"):
        model.merge()


def test_remove_restores_base_output_and_module_types(case):
    batch = case.toy.batch()
    reference = case.toy.base()
    model = case.adapted()
    model.remove("default")
    assert model.adapter_names == [] and model.active_adapters == []
    assert module_types(model.base_model) == module_types(reference)
    assert_same(logits(model, batch), logits(reference, batch))


def test_unload_returns_the_untouched_base_model(case):
    batch = case.toy.batch()
    reference = case.toy.base()
    model = case.adapted()
    model.merge()
    plain = model.unload()
    assert type(plain) is type(reference)
    assert module_types(plain) == module_types(reference)
    assert_same(logits(plain, batch), logits(reference, batch), atol=1e-5)


def test_merge_and_unload_gives_a_plain_model_that_round_trips_save_pretrained(case, tmp_path):
    batch = case.toy.batch()
    reference = case.toy.base()
    model = case.adapted()
    expected = logits(model, batch)
    plain = model.merge_and_unload()
    assert type(plain) is type(reference)
    assert module_types(plain) == module_types(reference)
    assert_same(logits(plain, batch), expected, atol=1e-4)

    plain.save_pretrained(tmp_path)
    reloaded = type(reference).from_pretrained(tmp_path).eval()
    assert_same(logits(reloaded, batch), expected, atol=1e-4)


def test_trainable_count_equals_peft(case):
    ours = dt.attach(case.toy.base(), case.config())
    theirs = peft_lora(case.toy, case.toy.base(), r=R, lora_alpha=ALPHA, **case.peft_kwargs)
    peft_trainable, peft_total = theirs.get_nb_trainable_parameters()
    assert ours.parameter_counts() == (peft_trainable, peft_total)
    assert f"trainable {peft_trainable:,} of {peft_total:,}" in ours.report()


@pytest.mark.parametrize("bias", ["all", "lora_only"])
def test_trained_biases_are_part_of_the_adapter_for_disabled_and_remove(bias):
    """With bias training the adapter owns updated biases; disabled() must still give the base
    output exactly, and remove() must give the base model back."""
    toy = TOYS["gpt2"]
    batch = toy.batch()
    base_out = logits(toy.base(), batch)
    model = dt.attach(toy.base(), dt.LoraConfig(r=R, alpha=ALPHA, init="random", targets=["q"], bias=bias))
    biases = [n for n, p in model.named_parameters() if p.requires_grad and not is_lora_param(n)]
    assert biases and all(n.endswith(".bias") for n in biases)
    randomize(model, only=lambda n: n in biases).eval()
    with model.disabled():
        assert_same(logits(model, batch), base_out)
    model.remove("default")
    assert_same(logits(model, batch), base_out)


def test_disabled_restores_the_adapter_after_an_exception():
    toy = TOYS["llama"]
    batch = toy.batch()
    model = CASES["llama-qv"].adapted()
    expected = logits(model, batch)
    with pytest.raises(RuntimeError, match="inside"):
        with model.disabled():
            raise RuntimeError("inside the block")
    assert_same(logits(model, batch), expected)


def test_empty_modules_to_save_turns_the_automatic_head_copy_off():
    model = dt.attach(TOYS["bert"].base(), dt.LoraConfig(r=R, targets=["q"], modules_to_save=[]))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(is_lora_param(n) for n in trainable)
    assert module_types(model.base_model.classifier) == module_types(TOYS["bert"].base().classifier)


def test_report_lists_every_adapted_module_and_the_counts():
    model = CASES["bert-qv"].adapted()
    report = model.report()
    for path in lora_paths(model) + ["classifier"]:
        assert re.search(rf"^{re.escape(path)}\s", report, re.MULTILINE), path
    trainable, total = model.parameter_counts()
    assert f"trainable {trainable:,} of {total:,} ({100 * trainable / total:.2f}%)" in report


@pytest.mark.parametrize("trainable", [False, True])
def test_a_loaded_adapter_trains_only_when_asked(trainable, tmp_path):
    CASES["llama-qv"].adapted().save(tmp_path)
    model = dt.load(TOYS["llama"].base(), tmp_path, trainable=trainable)
    lora = [p for n, p in model.named_parameters() if is_lora_param(n)]
    assert lora and all(p.requires_grad == trainable for p in lora)
    assert not any(p.requires_grad for n, p in model.named_parameters() if not is_lora_param(n))


def test_half_precision_base_keeps_its_dtype_and_trains_the_adapter():
    toy = TOYS["llama"]
    base = toy.base().to(torch.bfloat16)
    model = dt.attach(base, dt.LoraConfig(r=R, alpha=ALPHA, init="random", targets="all-linear")).train()
    out = model(**toy.loss_batch())
    assert out.logits.dtype == torch.bfloat16
    out.loss.backward()
    lora = [p for n, p in model.named_parameters() if is_lora_param(n)]
    assert lora and all(p.grad is not None and torch.isfinite(p.grad).all() for p in lora)
    assert all(p.dtype == torch.bfloat16 for n, p in model.named_parameters() if not is_lora_param(n))


def test_merging_a_lora_on_tied_input_embeddings_keeps_the_outputs():
    """GPT-2 ties wte to lm_head: baking the embedding update into the shared matrix would also
    change the output head, so merge must keep outputs equal or refuse."""
    toy = TOYS["gpt2"]
    batch = toy.batch()
    model = dt.attach(toy.base(), dt.LoraConfig(r=R, alpha=ALPHA, init="random", targets=["wte"])).eval()
    unmerged = logits(model, batch)
    try:
        model.merge()
    except dt.AdapterError:
        return
    assert_same(logits(model, batch), unmerged, atol=1e-4)


# --- part 2: single layers against the formula and against peft ------------------------------

def _scale(r: int, alpha: float, rslora: bool) -> float:
    return alpha / math.sqrt(r) if rslora else alpha / r


def _factors(model: dt.AdaptedModel, path: str, name: str = "default") -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) as peft lays them out: A [r, in] and B [out, r] (conv: [r, in, kh, kw], [out, r, 1, 1])."""
    params = dict(model.base_model.named_parameters())
    for a_key, b_key in (("lora_A.{}.weight", "lora_B.{}.weight"), ("lora_embedding_A.{}", "lora_embedding_B.{}")):
        a, b = params.get(f"{path}.{a_key.format(name)}"), params.get(f"{path}.{b_key.format(name)}")
        if a is not None:
            return a.detach(), b.detach()
    raise AssertionError(f"no LoRA factors at {path}")


def _attach(path: str, r: int = 3, alpha: float = 5.0, **kw) -> dt.AdaptedModel:
    return dt.attach(layer_zoo(), dt.LoraConfig(r=r, alpha=alpha, init="random", targets=[path], **kw)).eval()


@pytest.mark.parametrize("rslora", [False, True], ids=["alpha/r", "rslora"])
@pytest.mark.parametrize("r", [1, 4])
def test_linear_output_and_merged_weight_match_the_formula(r, rslora):
    model = _attach("lin", r=r, alpha=6.0, use_rslora=rslora)
    base = layer_zoo().lin
    a, b = _factors(model, "lin")
    assert a.shape == (r, 12) and b.shape == (10, r)
    s = _scale(r, 6.0, rslora)
    x = zoo_input("lin")
    expected = x @ base.weight.T + base.bias + s * (x @ a.T) @ b.T
    with torch.no_grad():
        assert_same(model.base_model.lin(x), expected, atol=1e-5)
        model.merge()
        assert_same(model.base_model.lin.base_layer.weight, base.weight + s * b @ a, atol=1e-6)
        assert_same(model.base_model.lin(x), expected, atol=1e-5)


def test_conv1d_output_and_merged_delta_are_transposed_correctly():
    model = _attach("conv1d")
    base = layer_zoo().conv1d
    a, b = _factors(model, "conv1d")
    assert base.weight.shape == (12, 10) and a.shape == (3, 12) and b.shape == (10, 3)
    s = 5.0 / 3
    x = zoo_input("conv1d")
    expected = x @ base.weight + base.bias + s * (x @ a.T) @ b.T
    with torch.no_grad():
        assert_same(model.base_model.conv1d(x), expected, atol=1e-5)
        model.merge()
        assert_same(model.base_model.conv1d.base_layer.weight, base.weight + s * (b @ a).T, atol=1e-6)
        assert_same(model.base_model.conv1d(x), expected, atol=1e-5)


def test_embedding_output_and_merged_weight_match_the_formula():
    model = _attach("emb")
    base = layer_zoo().emb
    a, b = _factors(model, "emb")
    assert a.shape == (3, 20) and b.shape == (6, 3)
    s = 5.0 / 3
    ids = torch.tensor([[0, 3, 19], [7, 7, 1]])
    expected = base.weight[ids] + s * a.T[ids] @ b.T
    with torch.no_grad():
        assert_same(model.base_model.emb(ids), expected, atol=1e-5)
        model.merge()
        assert_same(model.base_model.emb.base_layer.weight, base.weight + s * (b @ a).T, atol=1e-6)
        assert_same(model.base_model.emb(ids), expected, atol=1e-5)


@pytest.mark.parametrize("path", ["conv3", "conv1"])
def test_conv2d_output_and_merged_weight_match_the_formula(path):
    model = _attach(path)
    base = getattr(layer_zoo(), path)
    a, b = _factors(model, path)
    k = base.kernel_size
    assert a.shape == (3, 3, *k) and b.shape == (5, 3, 1, 1)
    s = 5.0 / 3
    delta = s * torch.einsum("or,rihw->oihw", b[:, :, 0, 0], a)
    x = zoo_input(path)
    expected = F.conv2d(x, base.weight + delta, base.bias, base.stride, base.padding)
    with torch.no_grad():
        assert_same(model.base_model.get_submodule(path)(x), expected, atol=1e-5)
        model.merge()
        assert_same(model.base_model.get_submodule(path).base_layer.weight, base.weight + delta, atol=1e-6)
        assert_same(model.base_model.get_submodule(path)(x), expected, atol=1e-5)


def _copy_lora_into_peft(ours: dt.AdaptedModel, theirs: nn.Module) -> int:
    """Copy our LoRA tensors into peft's layers, by peft's parameter names; returns how many."""
    target = dict(theirs.named_parameters())
    copied = 0
    with torch.no_grad():
        for name, p in ours.base_model.named_parameters():
            if is_lora_param(name):
                target[f"base_model.model.{name}"].copy_(p)
                copied += 1
    return copied


@pytest.mark.parametrize("path", ["lin", "conv1d", "emb", "conv3", "conv1"])
@pytest.mark.parametrize("rslora", [False, True], ids=["alpha/r", "rslora"])
def test_layer_matches_peft_on_identical_weights(path, rslora):
    ours = _attach(path, use_rslora=rslora)
    theirs = peft_lora(None, layer_zoo(), r=3, lora_alpha=5.0, target_modules=[path], use_rslora=rslora,
                       init_lora_weights=False, fan_in_fan_out=path == "conv1d")
    assert _copy_lora_into_peft(ours, theirs) == 2
    x = zoo_input(path)
    with torch.no_grad():
        expected = theirs.base_model.model.get_submodule(path)(x)
        assert_differs(expected, layer_zoo().get_submodule(path)(x))
        assert_same(ours.base_model.get_submodule(path)(x), expected, atol=1e-6)


def test_dropout_acts_on_the_lora_path_in_training_only():
    model = dt.attach(layer_zoo(), dt.LoraConfig(r=3, alpha=5.0, dropout=0.5, init="random", targets=["lin"]))
    lin = model.base_model.lin
    x = zoo_input("lin")
    base_out = layer_zoo().lin(x).detach()
    with torch.no_grad():
        model.eval()
        assert_same(lin(x), lin(x))
        model.train()
        first, second = lin(x), lin(x)
        assert_differs(first, second)
        with model.disabled():
            assert_same(lin(x), base_out)
