"""Mixed-adapter batches: each row of a batch goes through its own adapter, in one forward.

Written once for every method. A layer that has ``add_delta_(out, x, name)`` (an additive
update, like LoRA: add adapter ``name``'s update for input ``x`` to ``out`` in place) computes its
base output once for the whole batch and adds each adapter's update to its rows; any other layer
runs its own forward once per adapter on that adapter's rows. Rows are grouped into segments by
adapter; a contiguous segment is a view, not a copy. On CUDA, layers with
``adapter_delta_gathered`` use one batched matmul over per-row gathered weights.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Sequence

import torch
from torch import nn

from deltatune.errors import AdapterError


class RowRouting:
    """Which adapter each row of the batch uses; callable as ``routing(layer, x, *args, **kw)``."""

    def __init__(self, names: Sequence[str], device: torch.device | str = "cpu", gather: bool | None = None):
        self.names = list(names)
        rows: dict[str, list[int]] = {}
        for i, name in enumerate(self.names):
            rows.setdefault(name, []).append(i)
        self.segments: dict[str, slice | torch.Tensor] = {}
        for name, idx in rows.items():
            contiguous = idx == list(range(idx[0], idx[-1] + 1))
            self.segments[name] = slice(idx[0], idx[-1] + 1) if contiguous else torch.tensor(idx, device=device)
        self.gather = torch.device(device).type == "cuda" if gather is None else gather
        self._row_index: dict[tuple[str, ...], torch.Tensor] = {}
        self.device = device

    def row_index(self, names: tuple[str, ...]) -> torch.Tensor:
        """Per row, the position of its adapter in ``names`` (``len(names)`` for no adapter)."""
        if names not in self._row_index:
            position = {n: i for i, n in enumerate(names)}
            self._row_index[names] = torch.tensor([position.get(n, len(names)) for n in self.names],
                                                  device=self.device)
        return self._row_index[names]

    def __call__(self, layer: nn.Module, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if x.shape[0] != len(self.names):
            raise AdapterError(f"adapter_names has {len(self.names)} entries but the batch has {x.shape[0]} rows")
        present = [n for n in self.segments if n in layer.adapter_names]
        if self.gather and hasattr(layer, "adapter_delta_gathered") and present:
            base = layer.base_layer(x, *args, **kwargs)
            names = tuple(present)
            return base + layer.adapter_delta_gathered(x, names, self.row_index(names)).to(base.dtype)
        if hasattr(layer, "add_delta_"):
            out = layer.base_layer(x, *args, **kwargs)
            for name in present:
                rows = self.segments[name]
                if isinstance(rows, slice):
                    layer.add_delta_(out[rows], x[rows], name)
                else:
                    part = out.index_select(0, rows)
                    layer.add_delta_(part, x.index_select(0, rows), name)
                    out.index_copy_(0, rows, part)
            return out
        return self._per_segment(layer, x, *args, **kwargs)

    def _per_segment(self, layer, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        saved_active, saved_routing = layer.active_adapters, layer.routing
        layer.routing = None
        try:
            pieces = []
            for name, rows in self.segments.items():
                layer.active_adapters = [name] if name in layer.adapter_names else []
                part = x[rows] if isinstance(rows, slice) else x.index_select(0, rows)
                pieces.append((rows, layer(part, *args, **kwargs)))
        finally:
            layer.active_adapters, layer.routing = saved_active, saved_routing
        first = pieces[0][1]
        out = first.new_empty((x.shape[0], *first.shape[1:]))
        for rows, value in pieces:
            if isinstance(rows, slice):
                out[rows] = value
            else:
                out.index_copy_(0, rows, value)
        return out


def grouping_order(names: Sequence[str]) -> torch.Tensor | None:
    """A stable row order that makes each adapter's rows one contiguous segment, or None when
    they are contiguous already. Sorting the batch once at the model's entry turns every layer's
    per-adapter work into slices (views) instead of gathers and scatters."""
    first: dict[str, int] = {}
    for i, name in enumerate(names):
        first.setdefault(name, i)
    order = sorted(range(len(names)), key=lambda i: first[names[i]])
    runs = sum(1 for i in range(len(names)) if i == 0 or names[i] != names[i - 1])
    return None if runs == len(first) else torch.tensor(order)


def inverse_order(order: torch.Tensor) -> torch.Tensor:
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(len(order))
    return inverse


def take_rows(value, order: torch.Tensor, batch: int):
    """``value`` with its batch rows reordered by ``order``: tensors whose first dimension is the
    batch, inside tuples, lists and dicts (model outputs included); caches via ``reorder_cache``."""
    if isinstance(value, torch.Tensor):
        if value.dim() >= 1 and value.shape[0] == batch:
            return value.index_select(0, order.to(value.device))
        return value
    if hasattr(value, "reorder_cache"):  # a transformers Cache: reordered in place, as beam search does
        value.reorder_cache(order)
        return value
    if isinstance(value, dict):  # includes ModelOutput, which keeps its class when updated in place
        if type(value) is dict:
            return {k: take_rows(v, order, batch) for k, v in value.items()}
        for k in list(value.keys()):
            value[k] = take_rows(value[k], order, batch)
        return value
    if isinstance(value, (list, tuple)) and not hasattr(value, "_fields"):
        return type(value)(take_rows(v, order, batch) for v in value)
    return value


def call_mixed(call: Callable, adapter_names: Sequence[str], args: tuple, kwargs: dict, layers: Sequence[nn.Module]):
    """``call(*args, **kwargs)`` with row ``i`` through adapter ``adapter_names[i]`` in every one of
    ``layers``. Rows are grouped by adapter first and put back in the caller's order after, unless
    a cache (``past_key_values``) already fixes their order."""
    names = list(adapter_names)
    order = None if kwargs.get("past_key_values") is not None else grouping_order(names)
    if order is not None:
        batch = len(names)
        args, kwargs = take_rows(args, order, batch), take_rows(kwargs, order, batch)
        names = [names[i] for i in order.tolist()]
    first = args[0] if args else next((v for v in kwargs.values() if hasattr(v, "device")), None)
    with _routed(layers, RowRouting(names, device=first.device if first is not None else "cpu")):
        out = call(*args, **kwargs)
    return out if order is None else take_rows(out, inverse_order(order), len(names))


@contextlib.contextmanager
def _routed(layers: Sequence[nn.Module], routing: RowRouting) -> Iterator[None]:
    for layer in layers:
        layer.routing = routing
    try:
        yield
    finally:
        for layer in layers:
            layer.routing = None


# --- the adapted model's side: which adapters may mix, and the checked call -------------------

BASE_ADAPTER = "__base__"  # reserved: "no adapter", e.g. in mixed batches and the server


def check_mixable(model, names: Sequence[str]) -> None:
    """Raise :class:`AdapterError` unless every adapter of ``model`` (an AdaptedModel) in ``names``
    can share a mixed batch: it must act on weights, not on the inputs, and must not train base
    parameters that other adapters share (the bias option)."""
    for n in sorted(set(names) - {BASE_ADAPTER}):
        model._check(n)
        if n in model.model_adapters:
            raise AdapterError(f"adapter {n!r} acts on the inputs and cannot share a mixed batch")
        if model._shared.owner_among([n]) is not None:
            raise AdapterError("adapters that train base biases (the bias option) cannot share a mixed batch")


def call_model_mixed(model, call: Callable, adapter_names: Sequence[str], args: tuple, kwargs: dict):
    """``call`` (the base model or its ``generate``) with each row through its own adapter of
    ``model``, after the checks that make that well defined."""
    check_mixable(model, adapter_names)
    if model.merged:
        raise AdapterError("an adapter is merged into the weights: unmerge() before mixed-adapter calls")
    if model._shared.owner is not None:
        raise AdapterError("adapters that train base biases (the bias option) cannot share a mixed batch")
    return call_mixed(call, adapter_names, args, kwargs, [layer for _, layer in model.adapter_layers()])
