"""The bottleneck block ``up(act(down(x)))`` and the wrapper that places it at a module.

File keys follow the block's structure: ``adapter.down.weight``, ``adapter.up.bias`` ...
(with the adapter name removed, as in every deltatune/PEFT file).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from deltatune.core.layer import AdapterLayer
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

    def _row_groups(self, args: tuple, kwargs: dict) -> list[tuple[slice | torch.Tensor | None, list[str]]]:
        """``(rows, adapter names)`` pairs: the whole batch (``rows=None``) with the active
        adapters, or, in a mixed-adapter call, each row segment with its own adapter."""
        if self.adapters_disabled:
            return []
        routing = getattr(self, "routing", None)
        if routing is None:
            return [(None, list(self.active_adapters))]
        batch = _first_input(args, kwargs).shape[0]
        if batch != len(routing.names):
            raise AdapterError(f"adapter_names has {len(routing.names)} entries but the batch has {batch} rows")
        return [(rows, [name]) for name, rows in routing.segments.items() if name in self.placement]

    def _add_adapters(self, target: torch.Tensor, source: torch.Tensor, groups, placement: str) -> torch.Tensor:
        """``target`` plus, row group by row group, the adapters of ``placement`` applied to
        ``source`` (``source=None``: to ``target`` as it stands, stacking adapters)."""
        for rows, names in groups:
            for name in names:
                if self.placement[name] == placement:
                    x = target if source is None else source
                    target = _add_rows(target, rows, self.adapter_output(name, _take_rows(x, rows)))
        return target

    def forward(self, *args, **kwargs):
        groups = self._row_groups(args, kwargs)
        used = {self.placement[n] for _, names in groups for n in names}
        if not used:
            return self.base_layer(*args, **kwargs)
        x = _first_input(args, kwargs) if PARALLEL in used else None
        if RESIDUAL in used:
            args, kwargs = self._with_residual(groups, args, kwargs)
        result = self.base_layer(*args, **kwargs)
        if PARALLEL in used:
            result = self._add_adapters(result, x, groups, PARALLEL)
        return self._add_adapters(result, None, groups, SEQUENTIAL)

    def _with_residual(self, groups, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if "input_tensor" in kwargs:
            x = kwargs["input_tensor"]
            return args, {**kwargs, "input_tensor": self._add_adapters(x, x, groups, RESIDUAL)}
        if len(args) < 2:
            raise TypeError(f"{type(self.base_layer).__name__} was called without its input_tensor argument")
        return (args[0], self._add_adapters(args[1], args[1], groups, RESIDUAL), *args[2:]), kwargs

    def __getattr__(self, name: str):
        # model code reads attributes of the modules it calls (T5 checks ``self.wo.weight.dtype``)
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_layer":
                raise
            return getattr(self.base_layer, name)

    def merge(self, names=None) -> None:
        raise AdapterError(f"bottleneck adapters are nonlinear and cannot be merged into "
                           f"{type(self.base_layer).__name__} weights; keep the adapted model, or unload() it")

    def unmerge(self) -> None:
        pass  # nothing is ever merged


def _first_input(args: tuple, kwargs: dict) -> torch.Tensor:
    if args:
        return args[0]
    if len(kwargs) == 1:
        return next(iter(kwargs.values()))
    raise TypeError("this adapter reads the wrapped module's input: pass it as the first positional argument")


def _take_rows(x: torch.Tensor, rows) -> torch.Tensor:
    if rows is None:
        return x
    return x[rows] if isinstance(rows, slice) else x.index_select(0, rows)


def _add_rows(target: torch.Tensor, rows, values: torch.Tensor) -> torch.Tensor:
    """``target`` with ``values`` added to the given rows (all rows for ``None``), out of place."""
    if rows is None:
        return target + values
    if isinstance(rows, slice):
        pad = torch.zeros_like(target)
        pad[rows] = values
        return target + pad
    return target.index_add(0, rows, values)
