"""Compacter: the shared contract on the four toys, the parameter count against the paper's
formula, PHM weights against torch.kron, one shared slow-weight tensor, and training."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import deltatune as dt
from deltatune.methods.compacter import CompacterConfig, CompacterLayer, PHMLinear
from tests.methods import contract
from tests.methods.short_training import train_briefly

TOYS = contract.TOYS
D, K, N = 32, 8, 4  # toy hidden size, bottleneck, phm_dim
BERT_HEAD = D * 3 + 3
# wrapped modules per placement: 4 blocks per toy; T5: 2 encoder blocks (attention, FFN) and
# 2 decoder blocks (self-attention, cross-attention, FFN)
SITES = {"houlsby": {"bert": 8, "gpt2": 8, "llama": 8, "t5": 10}, "pfeiffer": {"bert": 4, "gpt2": 4, "llama": 4, "t5": 4}}


def paper_count(sites: int, d: int, k: int, n: int, r: int | None) -> int:
    """The docstring's formula: n^3 shared, and per wrapped module two PHM layers with biases."""
    per_site = 2 * r * (d + k) if r is not None else 2 * d * k // n
    return n ** 3 + sites * (per_site + d + k)


def config(style: str = "pfeiffer", **kw) -> CompacterConfig:
    return CompacterConfig(style=style, bottleneck=K, phm_dim=N, **kw)


@pytest.mark.parametrize("style", ["houlsby", "pfeiffer"])
@pytest.mark.parametrize("toy", TOYS.values(), ids=TOYS.keys())
def test_compacter_contract(toy, style, tmp_path):
    cfg = config(style)
    contract.check_only_adapter_parameters_train(toy, cfg)
    contract.check_changes_and_disables(toy, cfg)
    tensors = contract.check_save_load(toy, cfg, tmp_path)
    assert sum(k.endswith(".phm_rule") for k in tensors) == 1, "the shared slow weights are stored once"
    contract.check_remove_restores_base(toy, cfg)
    contract.check_mixed_batch(toy, cfg)
    head = BERT_HEAD if toy.name == "bert" else 0
    contract.check_trainable_count(toy, cfg, paper_count(SITES[style][toy.name], D, K, N, 1) + head)


@pytest.mark.parametrize("rank", [1, 3, None])
def test_parameter_count_matches_the_formula(rank):
    toy = TOYS["llama"]
    cfg = config("houlsby", phm_rank=rank)
    expected = paper_count(8, D, K, N, rank)
    contract.check_trainable_count(toy, cfg, expected)
    model = dt.attach(toy.base(), cfg)
    # the report and the saved tensors count the shared tensor once too
    saved = sum(t.numel() for _, layer in model.adapter_layers() for t in layer.adapter_state("default").values())
    assert saved == expected
    # the paper's count without biases, n^3 + 4 L r (k + d) for Houlsby placement over L blocks
    if rank is not None:
        biases = 8 * (D + K)
        assert expected - biases == N ** 3 + 4 * 4 * rank * (K + D)


def test_merge_is_refused_with_a_clear_error():
    model = dt.attach(TOYS["bert"].base(), config())
    with pytest.raises(dt.AdapterError, match="cannot be merged"):
        model.merge()


def test_phm_weight_is_the_sum_of_kronecker_products():
    torch.manual_seed(0)
    for rank in (2, None):
        layer = PHMLinear(12, 8, n=4, rank=rank)
        rule = torch.randn(4, 4, 4)
        fast = [layer.s[i] @ layer.t[i] for i in range(4)] if rank else list(layer.b)
        expected = sum(torch.kron(rule[i], fast[i]) for i in range(4))
        assert expected.shape == (8, 12)
        torch.testing.assert_close(layer.weight(rule), expected)
        x = torch.randn(5, 12)
        torch.testing.assert_close(layer(x, rule), x @ expected.T + layer.bias)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64-after-adding"])
def test_adapter_output_matches_the_formula(dtype):
    toy = TOYS["gpt2"]
    model = contract.perturbed(dt.attach(toy.base(), config(scaling=0.5))).to(dtype)
    layer = model.base_model.get_submodule("transformer.h.1.mlp.c_proj")
    assert {p.dtype for p in layer.adapter_parameters("default")} == {dtype}
    seen = {}
    layer.base_layer.register_forward_hook(lambda m, a, out: seen.setdefault("y", out))
    layer.register_forward_hook(lambda m, a, out: seen.setdefault("out", out))
    contract.logits(model, toy.loss_batch())
    block, rule, y = layer.compacter["default"], layer.phm_rule["default"], seen["y"]

    def kron_weight(phm):
        return sum(torch.kron(rule[i], phm.s[i] @ phm.t[i]) for i in range(N))
    down = F.gelu(y @ kron_weight(block.down).T + block.down.bias)
    expected = y + 0.5 * (down @ kron_weight(block.up).T + block.up.bias)
    torch.testing.assert_close(seen["out"], expected, atol=1e-6, rtol=1e-6)


def test_identity_at_initialisation():
    toy = TOYS["t5"]
    expected = contract.logits(toy.base(), toy.loss_batch())
    model = dt.attach(toy.base(), config("houlsby"))
    torch.testing.assert_close(contract.logits(model, toy.loss_batch()), expected, atol=0, rtol=0)


def _layers(model) -> list[CompacterLayer]:
    return [layer for _, layer in model.adapter_layers() if isinstance(layer, CompacterLayer)]


def test_slow_weights_are_one_tensor_with_gradients_from_every_layer():
    toy = TOYS["bert"]
    model = contract.perturbed(dt.attach(toy.base(), config("houlsby")))
    layers = _layers(model)
    rule = layers[0].phm_rule["default"]
    assert len(layers) == 8 and all(layer.phm_rule["default"] is rule for layer in layers)
    assert sum(p is rule for p in model.parameters()) == 1

    def rule_grads():
        model.zero_grad()
        model(**toy.loss_batch()).loss.backward()
        return rule.grad.clone()
    total = rule_grads()
    for layer in layers:
        # give this one layer its own copy: the shared gradient loses exactly that layer's part
        own = torch.nn.Parameter(rule.detach().clone())
        layer.phm_rule["default"] = own
        rest = rule_grads()
        layer.phm_rule["default"] = rule
        assert own.grad.abs().sum() > 0
        torch.testing.assert_close(rest + own.grad, total, atol=1e-6, rtol=1e-5)


def test_two_adapters_have_their_own_slow_weights(tmp_path):
    toy = TOYS["llama"]
    model = dt.attach(toy.base(), config(), "a")
    model.add(config("houlsby"), "b")
    layer = model.base_model.get_submodule("model.layers.2.mlp.down_proj")
    assert layer.phm_rule["a"] is not layer.phm_rule["b"]
    model.use(["b"])
    contract.perturbed(model)
    expected = contract.logits(model, toy.loss_batch())
    model.save(tmp_path, adapter="b")
    loaded = dt.load(toy.base(), tmp_path, "b").eval()
    torch.testing.assert_close(contract.logits(loaded, toy.loss_batch()), expected, atol=1e-6, rtol=0)
    rule = _layers(loaded)[0].phm_rule["b"]
    assert all(layer.phm_rule["b"] is rule for layer in _layers(loaded))
    torch.testing.assert_close(rule, layer.phm_rule["b"].detach())


def test_sizes_not_divisible_by_phm_dim_are_refused_before_anything_is_wrapped():
    with pytest.raises(dt.ConfigError, match="phm_dim"):
        CompacterConfig(bottleneck=6, phm_dim=4)
    base = TOYS["gpt2"].base()
    with pytest.raises(dt.ConfigError, match="divisible by phm_dim=4"):
        dt.attach(base, CompacterConfig(reduction_factor=16, phm_dim=4))  # 32 // 16 = 2
    assert not any(isinstance(m, dt.core.layer.AdapterLayer) for m in base.modules())


@pytest.mark.parametrize("bad, match", [({"phm_dim": 0}, "phm_dim"), ({"phm_rank": 0}, "phm_rank"),
                                        ({"style": "diagonal"}, "style")])
def test_config_validation(bad, match):
    with pytest.raises(dt.ConfigError, match=match):
        CompacterConfig(**bad)


def test_compacter_learns_sst2_on_minilm():
    run = train_briefly(CompacterConfig(), steps=60, lr=3e-3)
    assert run.accuracy_after > run.accuracy_before + 0.10, run
