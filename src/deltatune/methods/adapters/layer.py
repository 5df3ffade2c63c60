"""The bottleneck block ``up(act(down(x)))`` and the wrapper that places it at a module.

File keys follow the block's structure: ``adapter.down.weight``, ``adapter.up.bias`` ...
(with the adapter name removed, as in every deltatune/PEFT file).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from deltatune.core.layer import AdapterLayer, read_through
from deltatune.core.routing import first_input
from deltatune.errors import AdapterError
from deltatune.methods.adapters.placement import PARALLEL, RESIDUAL, SEQUENTIAL

_ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh, "identity": nn.Identity,
}


def make_activation(name: str) -> nn.Module:
    """The activation module for one of :data:`deltatune.methods.adapters.config.ACTIVATION_NAMES`."""
    return _ACTIVATIONS[name]()


def reference_weight(module: nn.Module) -> torch.Tensor:
    """A weight of ``module`` (its own, or its first sub-module's) for device and dtype."""
    return next(module.parameters())


class Bottleneck(nn.Module):
    """``up(act(down(x)))``: ``in_features -> width -> out_features``, both projections with bias."""

    def __init__(self, in_features: int, width: int, out_features: int, activation: str, init: str,
                 *, device=None, dtype=None) -> None:
        super().__init__()
        self.down = nn.Linear(in_features, width, device=device, dtype=dtype)
        self.activation = make_activation(activation)
        self.up = nn.Linear(width, out_features, device=device, dtype=dtype)
        with torch.no_grad():
            if init == "near-identity":
                for proj in (self.down, self.up):
                    nn.init.trunc_normal_(proj.weight, std=1e-2, a=-2e-2, b=2e-2)
                    proj.bias.zero_()
            else:  # "identity": down keeps nn.Linear's init, the adapter starts as exactly zero
                self.down.bias.zero_()
                self.up.weight.zero_()
                self.up.bias.zero_()

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the block computes in: its weights'. Read from the weight at each call, so it
        follows a later ``.to(dtype)`` / ``.half()`` of the model; one attribute read, where
        ``next(parameters())`` walks the module tree."""
        return self.down.weight.dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.activation(self.down(x)))


class BottleneckLayer(AdapterLayer):
    """Holds a module as ``base_layer`` and one bottleneck block per adapter, placed sequentially
    (on the output), in parallel (on the input) or on the residual input (see
    :mod:`deltatune.methods.adapters.placement`).

    Nonlinear, so never merged: ``merge`` raises and there is nothing to unmerge.
    """

    adapter_attrs = ("adapter",)
    mergeable = False

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        # the blocks' container is named by the subclass (``adapter``, ``compacter``)
        setattr(self, self.adapter_attrs[0], nn.ModuleDict())
        self.placement: dict[str, str] = {}
        self.scaling: dict[str, float] = {}

    def add_adapter(self, name: str, block: nn.Module, placement: str, scaling: float) -> None:
        """Add adapter ``name``: ``block`` maps the adapter's input to the change it makes."""
        self.blocks()[name] = block
        self.placement[name] = placement
        self.scaling[name] = float(scaling)

    def blocks(self) -> nn.ModuleDict:
        """The per-adapter blocks (subclasses keep them under their own attribute name)."""
        return self._container(self.adapter_attrs[0])

    def _forget(self, name: str) -> None:
        self.placement.pop(name, None)
        self.scaling.pop(name, None)

    def adapter_output(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """``scaling * block(x)`` of adapter ``name``, computed in ``block.dtype``, returned in ``x``'s."""
        block = self.blocks()[name]
        return (block(x.to(block.dtype)) * self.scaling[name]).to(x.dtype)

    def _add_adapters(self, target: torch.Tensor, source: torch.Tensor | None, names: list[str],
                      placement: str) -> torch.Tensor:
        """``target`` plus the adapters of ``placement`` among ``names`` applied to ``source``
        (``source=None``: to ``target`` as it stands, stacking adapters)."""
        for name in names:
            if self.placement[name] == placement:
                target = target + self.adapter_output(name, target if source is None else source)
        return target

    def adapted_forward(self, *args, **kwargs):
        names = self.unmerged_active()
        used = {self.placement[n] for n in names}
        if not used:
            return self.base_layer(*args, **kwargs)
        x = first_input(args, kwargs) if PARALLEL in used else None
        if RESIDUAL in used:
            args, kwargs = self._with_residual(names, args, kwargs)
        result = self.base_layer(*args, **kwargs)
        if PARALLEL in used:
            result = self._add_adapters(result, x, names, PARALLEL)
        return self._add_adapters(result, None, names, SEQUENTIAL)

    def _with_residual(self, names: list[str], args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if "input_tensor" in kwargs:
            x = kwargs["input_tensor"]
            return args, {**kwargs, "input_tensor": self._add_adapters(x, x, names, RESIDUAL)}
        if len(args) < 2:
            raise TypeError(f"{type(self.base_layer).__name__} was called without its input_tensor argument")
        return (args[0], self._add_adapters(args[1], args[1], names, RESIDUAL), *args[2:]), kwargs

    def __getattr__(self, name: str):
        return read_through(self, name, "base_layer")

    def merge(self, names=None) -> None:
        raise AdapterError(f"bottleneck adapters are nonlinear and cannot be merged into "
                           f"{type(self.base_layer).__name__} weights; keep the adapted model, or unload() it")

    def unmerge(self) -> None:
        pass  # nothing is ever merged
