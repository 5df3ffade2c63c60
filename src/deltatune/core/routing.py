"""Mixed-adapter batches: each row of a batch goes through its own adapter, in one forward.

Written once for every method: :class:`~deltatune.core.layer.AdapterLayer`'s forward hands a
mixed batch to the :class:`RowRouting` of the call. A layer that has ``add_delta_(out, x, name)``
(an additive update, like LoRA: adds adapter ``name``'s update for ``x`` to ``out`` in place)
computes its base output once for the whole batch and adds each adapter's update to its rows; any other layer runs its per-adapter forward (``adapted_forward``)
once per adapter on that adapter's rows, every batch-sized input cut to those rows. Rows are
grouped into segments by adapter; a contiguous segment is a view, not a copy. On CUDA, layers
with ``adapter_delta_gathered`` use one batched matmul over per-row gathered weights.
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

    def __call__(self, layer: nn.Module, *args, **kwargs) -> torch.Tensor:
        if not layer.mixes_rows:
            raise AdapterError(f"a {type(layer).__name__} layer cannot take part in a mixed-adapter batch; "
                               f"run its adapter's rows in a call of their own")
        x = first_input(args, kwargs)
        if x.shape[0] != len(self.names):
            raise AdapterError(f"adapter_names has {len(self.names)} entries but the batch has {x.shape[0]} rows")
        present = [n for n in self.segments if n in layer.adapter_names]
        if self.gather and hasattr(layer, "adapter_delta_gathered") and present:
            base = layer.base_layer(*args, **kwargs)
            names = tuple(present)
            return base + layer.adapter_delta_gathered(x, names, self.row_index(names)).to(base.dtype)
        if hasattr(layer, "add_delta_"):
            out = layer.base_layer(*args, **kwargs)
            for name in present:
                rows = self.segments[name]
                if isinstance(rows, slice):
                    layer.add_delta_(out[rows], x[rows], name)
                else:
                    part = out.index_select(0, rows)
                    layer.add_delta_(part, x.index_select(0, rows), name)
                    out.index_copy_(0, rows, part)
            return out
        return self._per_segment(layer, args, kwargs)

    def _per_segment(self, layer, args: tuple, kwargs: dict) -> torch.Tensor:
        """The layer's per-adapter forward on each adapter's rows, put together again."""
        batch, saved_active = len(self.names), layer.active_adapters
        if any(hasattr(v, "reorder_cache") for v in (*args, *kwargs.values())):
            raise AdapterError(f"a {type(layer.base_layer).__name__} copied per adapter cannot split the key/value "
                               f"cache it is given between adapters in a mixed-adapter batch; pass use_cache=False, "
                               f"or run each adapter's rows in a call of their own")
        try:
            pieces = []
            for name, rows in self.segments.items():
                layer.active_adapters = [name] if name in layer.adapter_names else []
                part_args = tuple(_rows(v, rows, batch) for v in args)
                part_kwargs = {k: _rows(v, rows, batch) for k, v in kwargs.items()}
                pieces.append((rows, layer.adapted_forward(*part_args, **part_kwargs)))
        finally:
            layer.active_adapters = saved_active
        return _joined([rows for rows, _ in pieces], [value for _, value in pieces], batch, layer)


def _joined(segments: list, values: list, batch: int, layer: nn.Module):
    """One output for the whole batch from each segment's: tensors row by row, inside tuples,
    lists, dicts and model outputs; None stays None. Anything else (a key/value cache made per
    segment) cannot be joined, and says so."""
    first = values[0]
    if first is None:
        return None
    if isinstance(first, torch.Tensor) and first.dim() > 0:
        out = first.new_empty((batch, *first.shape[1:]))
        for rows, value in zip(segments, values):
            if isinstance(rows, slice):
                out[rows] = value
            else:
                out.index_copy_(0, rows, value)
        return out
    if isinstance(first, dict):  # includes ModelOutput, rebuilt with its own class
        joined = {k: _joined(segments, [v[k] for v in values], batch, layer) for k in first}
        return joined if type(first) is dict else type(first)(**joined)
    if isinstance(first, (tuple, list)) and not hasattr(first, "_fields"):
        return type(first)(_joined(segments, [v[i] for v in values], batch, layer) for i in range(len(first)))
    raise AdapterError(f"a mixed-adapter batch cannot put together the {type(first).__name__} that "
                       f"{type(layer.base_layer).__name__} returns for each adapter's rows; pass use_cache=False "
                       f"(for a key/value cache), or run each adapter's rows in a call of their own")


def first_input(args: tuple, kwargs: dict) -> torch.Tensor:
    """A layer call's main input: the first positional argument, else the first keyword tensor."""
    if args:
        return args[0]
    found = next((v for v in kwargs.values() if isinstance(v, torch.Tensor)), None)
    if found is None:
        raise TypeError("this adapter reads the wrapped module's input: pass it as the first positional argument")
    return found


def _rows(value, rows: slice | torch.Tensor, batch: int):
    """``value``'s rows ``rows`` when it is a tensor with one row per batch entry (also inside a
    tuple, like rotary position embeddings), else ``value``."""
    if isinstance(value, tuple) and not hasattr(value, "_fields"):
        return tuple(_rows(v, rows, batch) for v in value)
    if not isinstance(value, torch.Tensor) or value.dim() == 0 or value.shape[0] != batch:
        return value
    return value[rows] if isinstance(rows, slice) else value.index_select(0, rows)


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
