"""LoRA and IA3 under ``torch.compile`` (``train.compile: true``): the fused layers trace without
splitting the graph, and the compiled layer computes what the eager one does, gradients included.

The "eager" and "aot_eager" backends run dynamo's tracing (and, for aot_eager, the traced
backward) without inductor's code generation, so these tests take seconds, not minutes; the slow
test in tests/train/test_loop.py trains with the real compiler.
"""

from __future__ import annotations

import pytest
import torch
import torch._dynamo

import deltatune as dt
from deltatune.methods.ia3.layer import IA3Linear
from deltatune.methods.lora import LoraLinear
from tests.methods.contract import TOYS, perturbed

CONFIGS = {"lora": lambda: dt.LoraConfig(r=4, alpha=8, targets="all-linear"), "ia3": lambda: dt.IA3Config()}


def _graph_breaks(model: torch.nn.Module, inputs: dict) -> int:
    torch._dynamo.reset()
    return torch._dynamo.explain(model)(**inputs).graph_break_count


@pytest.mark.parametrize("method", CONFIGS)
def test_adapter_layers_add_no_graph_break(method):
    """The adapted model splits into no more graphs than the bare model does. (IA3 used to break
    the graph at every layer: it read its scale's zeros back to the host.)"""
    toy = TOYS["llama"]  # the architecture of the CUDA benchmark; tracing a toy takes seconds
    inputs = toy.loss_batch()
    bare = _graph_breaks(toy.base(), inputs)
    adapted = dt.attach(toy.base(), CONFIGS[method]())
    assert _graph_breaks(adapted, inputs) == bare


def _lora_layer() -> LoraLinear:
    layer = LoraLinear(torch.nn.Linear(6, 5).requires_grad_(False))
    layer.add_adapter("a", r=3, alpha=6, init="random")
    layer.set_active(["a"])
    return layer


def _ia3_layer() -> IA3Linear:
    layer = IA3Linear(torch.nn.Linear(6, 5).requires_grad_(False))
    layer.add_adapter("in", feedforward=True, init="random")
    layer.add_adapter("out", feedforward=False, init="random")
    layer.set_active(["in", "out"])
    return layer


def _output_and_grads(layer: torch.nn.Module, x: torch.Tensor, g: torch.Tensor, run=None) -> tuple[torch.Tensor, dict]:
    """``run(x)`` (by default ``layer(x)``) and the gradients of x and of ``layer``'s parameters."""
    layer.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    y = (layer if run is None else run)(x)
    y.backward(g)
    grads = {n: p.grad.clone() for n, p in layer.named_parameters() if p.grad is not None}
    return y.detach(), {"x": x.grad, **grads}


@pytest.mark.parametrize("build", [_lora_layer, _ia3_layer], ids=["lora", "ia3"])
def test_compiled_fused_layer_equals_eager(build):
    torch.manual_seed(0)
    layer = build()
    x, g = torch.randn(2, 4, 6), torch.randn(2, 4, 5)
    assert "Function" in type(layer(x.detach().requires_grad_()).grad_fn).__name__  # the fused node runs
    expected_y, expected = _output_and_grads(layer, x, g)
    torch._dynamo.reset()
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)  # fullgraph: a break is an error
    y, grads = _output_and_grads(layer, x, g, run=compiled)
    torch.testing.assert_close(y, expected_y)
    assert grads.keys() == expected.keys() and len(grads) >= 2
    for name in expected:
        torch.testing.assert_close(grads[name], expected[name], msg=name)


def test_trained_lora_model_compiles_with_eager_gradients():
    """A whole adapted model, traced with its backward: the loss and every adapter gradient."""
    toy = TOYS["llama"]
    model = perturbed(dt.attach(toy.base(), CONFIGS["lora"]()), scale=0.05)
    inputs = toy.loss_batch()

    def step(m):
        model.zero_grad(set_to_none=True)
        loss = m(**inputs).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    expected_loss, expected = step(model)
    torch._dynamo.reset()
    loss, grads = step(torch.compile(model, backend="aot_eager"))
    torch.testing.assert_close(loss, expected_loss)
    assert grads.keys() == expected.keys() and len(grads) > 0
    for name in expected:
        torch.testing.assert_close(grads[name], expected[name], atol=1e-6, rtol=1e-5, msg=name)
