"""The fused LoRA autograd node computes exactly what the plain autograd path computes."""

from __future__ import annotations

import pytest
import torch
from transformers.pytorch_utils import Conv1D

import deltatune as dt
from deltatune.methods.lora import LoraLinear
from tests.methods.contract import TOYS, assert_fused_path_equals_plain, perturbed


@pytest.mark.parametrize("dropout", [0.0, 0.1])
@pytest.mark.parametrize("bias", ["none", "all"])
@pytest.mark.parametrize("toy", TOYS.values(), ids=TOYS.keys())
def test_fused_path_equals_plain_autograd(toy, bias, dropout, monkeypatch):
    # a small perturbation keeps gradients O(1), so 1e-5 is a meaningful absolute tolerance
    config = dt.LoraConfig(r=4, alpha=8, targets="all-linear", bias=bias, dropout=dropout)
    model = perturbed(dt.attach(toy.base(), config), scale=0.05)
    model.train()
    assert_fused_path_equals_plain(model, toy.loss_batch(), LoraLinear, monkeypatch)


def _layer(kind: str, dtype: torch.dtype = torch.float32) -> LoraLinear:
    torch.manual_seed(0)
    base = torch.nn.Linear(6, 5) if kind == "linear" else Conv1D(5, 6)
    base.to(dtype).requires_grad_(False)  # as dt.attach leaves it; a trainable base takes the plain path
    layer = LoraLinear(base)
    layer.add_adapter("a", r=3, alpha=6, init="random")
    layer.set_active(["a"])
    return layer


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "plain"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_layer_output_and_gradients_match_the_formula(kind, dtype, fused, monkeypatch):
    monkeypatch.setattr(LoraLinear, "use_fused", fused)
    layer = _layer(kind, dtype)
    base = layer.base_layer
    x = torch.randn(2, 4, 6, dtype=dtype, requires_grad=True)
    y = layer(x)
    w = base.weight if kind == "linear" else base.weight.t()  # [out, in]
    a, b = layer.lora_A["a"].weight, layer.lora_B["a"].weight
    torch.testing.assert_close(y, x @ w.T + base.bias + 2.0 * (x @ a.T) @ b.T)
    g = torch.randn_like(y)
    y.backward(g)
    torch.testing.assert_close(x.grad, g @ w + 2.0 * (g @ b) @ a)
    torch.testing.assert_close(b.grad, 2.0 * torch.einsum("nto,ntr->or", g, x @ a.T))
    torch.testing.assert_close(a.grad, 2.0 * torch.einsum("ntr,nti->ri", g @ b, x))
    assert base.weight.grad is None and base.bias.grad is None


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_fused_layer_under_bf16_autocast_keeps_the_update_apart_from_the_weight(kind):
    # Folding the update into the weight is exact enough in fp32 but not in bf16: with weights of
    # +-256 (bf16 spacing 2 there) an update of 0.06 per weight would round away entirely. The
    # weights here cancel on an all-ones input, so the output is the update alone.
    layer = _layer(kind)
    with torch.no_grad():
        signs = torch.tensor([1.0, -1.0] * 3)
        w = 256.0 * signs.expand(5, 6)  # [out, in]
        layer.base_layer.weight.copy_(w if kind == "linear" else w.t())
        layer.base_layer.bias.zero_()
        layer.lora_A["a"].weight.fill_(0.1)
        layer.lora_B["a"].weight.fill_(0.1)
    x = torch.ones(2, 4, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    # s * (x A^T) B^T = 2 * (6 * 0.1 per rank) * (3 ranks * 0.1) = 0.36 for every output
    torch.testing.assert_close(y.float(), torch.full((2, 4, 5), 0.36), atol=4e-3, rtol=0)


@pytest.mark.parametrize("autocast", [False, True], ids=["fold", "split"])
def test_a_frozen_factor_gets_no_gradient_and_the_others_match_the_formula(autocast):
    """With A frozen (as LoRA-FA trains) the node skips dL/d(xA^T) where nothing needs it; x and B
    still get their exact gradients, in the folded (fp32) and the split (bf16 autocast) mode."""
    layer = _layer("linear")
    a, b = layer.lora_A["a"].weight, layer.lora_B["a"].weight
    a.requires_grad_(False)
    w = layer.base_layer.weight
    x = torch.randn(2, 4, 6, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        y = layer(x)
    assert "LoraLinearFunction" in type(y.grad_fn).__name__
    g = torch.randn_like(y)
    y.backward(g)
    g = g.float()
    tol = {"atol": 3e-2, "rtol": 3e-2} if autocast else {}  # bf16 operands
    torch.testing.assert_close(x.grad, g @ w + 2.0 * (g @ b) @ a, **tol)
    torch.testing.assert_close(b.grad, 2.0 * torch.einsum("nto,ntr->or", g, x @ a.T), **tol)
    assert a.grad is None
