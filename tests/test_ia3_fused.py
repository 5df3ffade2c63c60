"""The fused IA3 autograd node computes exactly what the plain autograd path computes."""

from __future__ import annotations

import pytest
import torch
from transformers.pytorch_utils import Conv1D

import deltatune as dt
from deltatune.methods.ia3.layer import IA3Linear
from tests.methods.contract import TOYS, assert_fused_path_equals_plain, perturbed


@pytest.mark.parametrize("two_adapters", [False, True], ids=["one", "two-active"])
@pytest.mark.parametrize("toy", TOYS.values(), ids=TOYS.keys())
def test_fused_path_equals_plain_autograd(toy, two_adapters, monkeypatch):
    # the default targets scale some outputs (attention) and some inputs (feed-forward)
    model = dt.attach(toy.base(), dt.IA3Config())
    if two_adapters:
        model.add(dt.IA3Config(), name="second")
        model.use(["default", "second"])
    model = perturbed(model, scale=0.05).train()
    grads = assert_fused_path_equals_plain(model, toy.loss_batch(), IA3Linear, monkeypatch)
    assert sum(".ia3_l." in n for n in grads) >= 2 * (2 if two_adapters else 1)


@pytest.mark.parametrize("input_grad", [True, False], ids=["input-grad", "no-input-grad"])
@pytest.mark.parametrize("zero_in", [None, "out", "in"], ids=["nonzero", "zero-out", "zero-in"])
@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_fused_layer_matches_the_formula(kind, zero_in, input_grad):
    """``y = ((x * l_in) W^T + b) * l_out`` and its gradients, written out by hand; an exact zero
    in ``l_out`` or ``l_in`` (where the folded path's division could not recover the product
    without that scale); an input that needs no gradient (the input scale is not folded then)."""
    torch.manual_seed(0)
    base = torch.nn.Linear(6, 5) if kind == "linear" else Conv1D(5, 6)
    base.requires_grad_(False)
    layer = IA3Linear(base)
    layer.add_adapter("in", feedforward=True, init="random")
    layer.add_adapter("out", feedforward=False, init="random")
    layer.set_active(["in", "out"])
    if zero_in is not None:
        with torch.no_grad():
            layer.ia3_l[zero_in].view(-1)[2] = 0.0
    assert layer._fusable()
    x = torch.randn(2, 4, 6, requires_grad=input_grad)
    y = layer(x)
    assert y.grad_fn is not None and "IA3LinearFunction" in type(y.grad_fn).__name__
    w = base.weight if kind == "linear" else base.weight.t()  # [out, in]
    l_in, l_out = layer.ia3_l["in"].flatten(), layer.ia3_l["out"].flatten()
    pre = (x * l_in) @ w.T + base.bias
    torch.testing.assert_close(y, pre * l_out)
    g = torch.randn_like(y)
    y.backward(g)
    if input_grad:
        torch.testing.assert_close(x.grad, ((g * l_out) @ w) * l_in)
    torch.testing.assert_close(layer.ia3_l["out"].grad.flatten(), (g * pre).sum((0, 1)))
    for name in ("in", "out"):
        assert torch.isfinite(layer.ia3_l[name].grad).all()
    torch.testing.assert_close(layer.ia3_l["in"].grad.flatten(), (((g * l_out) @ w) * x).sum((0, 1)))
    assert base.weight.grad is None and base.bias.grad is None
