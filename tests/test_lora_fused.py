"""The fused LoRA autograd node computes exactly what the plain autograd path computes."""

from __future__ import annotations

import pytest
import torch
from transformers.pytorch_utils import Conv1D

import deltatune as dt
from deltatune.methods.lora import LoraLinear
from tests.methods.contract import TOYS, assert_fused_path_equals_plain, perturbed


@pytest.mark.parametrize("bias", ["none", "all"])
@pytest.mark.parametrize("toy", TOYS.values(), ids=TOYS.keys())
def test_fused_path_equals_plain_autograd(toy, bias, monkeypatch):
    # a small perturbation keeps gradients O(1), so 1e-5 is a meaningful absolute tolerance
    model = perturbed(dt.attach(toy.model(), dt.LoraConfig(r=4, alpha=8, targets="all-linear", bias=bias)), scale=0.05)
    model.train()
    assert_fused_path_equals_plain(model, toy.inputs(), LoraLinear, monkeypatch)


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_fused_layer_input_gradient_matches_the_formula(kind):
    torch.manual_seed(0)
    base = torch.nn.Linear(6, 5) if kind == "linear" else Conv1D(5, 6)
    base.requires_grad_(False)  # as dt.attach leaves it; a trainable base takes the plain path
    layer = LoraLinear(base)
    layer.add_adapter("a", r=3, alpha=6, init="random")
    layer.set_active(["a"])
    x = torch.randn(2, 4, 6, requires_grad=True)
    y = layer(x)
    w = base.weight if kind == "linear" else base.weight.t()  # [out, in]
    a, b = layer.lora_A["a"].weight, layer.lora_B["a"].weight
    torch.testing.assert_close(y, x @ w.T + base.bias + 2.0 * (x @ a.T) @ b.T)
    g = torch.randn_like(y)
    y.backward(g)
    torch.testing.assert_close(x.grad, g @ w + 2.0 * (g @ b) @ a)
    torch.testing.assert_close(b.grad, 2.0 * torch.einsum("nto,ntr->or", g, x @ a.T))
    assert base.weight.grad is None and base.bias.grad is None
