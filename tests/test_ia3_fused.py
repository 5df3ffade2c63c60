"""The fused IA3 autograd node computes exactly what the plain autograd path computes."""

from __future__ import annotations

import pytest
import torch
from transformers.pytorch_utils import Conv1D

import deltatune as dt
from deltatune.methods.ia3.layer import IA3Linear
from tests.methods.contract import TOYS, perturbed


def outputs_and_grads(model, inputs, fused: bool, monkeypatch):
    monkeypatch.setattr(IA3Linear, "use_fused", fused)
    model.zero_grad(set_to_none=True)
    torch.manual_seed(0)  # the same dropout masks in the base model for both paths
    out = model(**inputs)
    out.loss.backward()
    # (with two active adapters only the first one's classification head takes part)
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.logits.detach().clone(), grads


@pytest.mark.parametrize("two_adapters", [False, True], ids=["one", "two-active"])
@pytest.mark.parametrize("toy", TOYS.values(), ids=TOYS.keys())
def test_fused_path_equals_plain_autograd(toy, two_adapters, monkeypatch):
    # the default targets scale some outputs (attention) and some inputs (feed-forward)
    model = dt.attach(toy.model(), dt.IA3Config())
    if two_adapters:
        model.add(dt.IA3Config(), name="second")
        model.use(["default", "second"])
    model = perturbed(model, scale=0.05).train()
    fused_logits, fused_grads = outputs_and_grads(model, toy.inputs(), True, monkeypatch)
    plain_logits, plain_grads = outputs_and_grads(model, toy.inputs(), False, monkeypatch)
    torch.testing.assert_close(fused_logits, plain_logits, atol=1e-5, rtol=1e-5)
    assert fused_grads.keys() == plain_grads.keys()
    assert sum(".ia3_l." in n for n in plain_grads) >= 2 * (2 if two_adapters else 1)
    for name in plain_grads:
        torch.testing.assert_close(fused_grads[name], plain_grads[name], atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_fused_layer_matches_the_formula(kind):
    """``y = ((x * l_in) W^T + b) * l_out`` and its gradients, written out by hand."""
    torch.manual_seed(0)
    base = torch.nn.Linear(6, 5) if kind == "linear" else Conv1D(5, 6)
    base.requires_grad_(False)
    layer = IA3Linear(base)
    layer.add_adapter("in", feedforward=True, init="random")
    layer.add_adapter("out", feedforward=False, init="random")
    layer.set_active(["in", "out"])
    assert layer._fusable()
    x = torch.randn(2, 4, 6, requires_grad=True)
    y = layer(x)
    assert y.grad_fn is not None and "IA3LinearFunction" in type(y.grad_fn).__name__
    w = base.weight if kind == "linear" else base.weight.t()  # [out, in]
    l_in, l_out = layer.ia3_l["in"].flatten(), layer.ia3_l["out"].flatten()
    pre = (x * l_in) @ w.T + base.bias
    torch.testing.assert_close(y, pre * l_out)
    g = torch.randn_like(y)
    y.backward(g)
    torch.testing.assert_close(x.grad, ((g * l_out) @ w) * l_in)
    torch.testing.assert_close(layer.ia3_l["out"].grad.flatten(), (g * pre).sum((0, 1)))
    torch.testing.assert_close(layer.ia3_l["in"].grad.flatten(), (((g * l_out) @ w) * x).sum((0, 1)))
    assert base.weight.grad is None and base.bias.grad is None
