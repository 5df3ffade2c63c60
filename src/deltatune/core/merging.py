"""Baking adapters into the base weights and taking the wrappers out again.

``merge`` checks every layer first (mergeable, not tied to another module, not merged twice)
and only then adds the deltas (``AdapterLayer.merge``, written once on ``delta_weight``).
``merge_and_unload`` dequantizes k-bit base layers before merging; ``unload`` puts the original
modules back. :class:`~deltatune.core.model.AdaptedModel`'s methods of the same names call these.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Sequence

from torch import nn

from deltatune.core.layer import ModulesToSave
from deltatune.core.quantized import handler_for
from deltatune.errors import AdapterError

if TYPE_CHECKING:
    from deltatune.core.model import AdaptedModel


def merge(model: "AdaptedModel", names: Sequence[str]) -> None:
    """Add adapters ``names`` into the weights of every layer that carries them, or raise
    :class:`AdapterError` before changing any weight."""
    for n in names:
        model._check(n)
        if n in model.model_adapters:
            raise AdapterError(f"adapter {n!r} ({type(model.configs[n]).__name__}) acts on the inputs, "
                               f"not on weights, and cannot be merged")
    layers = [(p, layer) for p, layer in model.adapter_layers() if set(names) & set(layer.adapter_names)]
    tied = tied_parameter_names(model.base_model)
    for path, layer in layers:
        if not layer.mergeable and not isinstance(layer, ModulesToSave):
            raise AdapterError(f"{path}: a {type(layer).__name__} cannot be merged into the weights")
        weight = getattr(layer.base_layer, "weight", None)
        others = [n for n in tied.get(id(weight), []) if not n.startswith(path + ".")]
        if weight is not None and others and not isinstance(layer, ModulesToSave):
            raise AdapterError(f"{path}.weight is tied to {others[0]}: merging would change that module "
                               f"too; keep the adapter unmerged, or untie the weights first")
        twice = set(names) & set(layer.merged_adapters)
        if twice:
            raise AdapterError(f"adapter {sorted(twice)[0]!r} is already merged; call unmerge() first")
    for _, layer in layers:
        layer.merge([n for n in names if n in layer.adapter_names])


def tied_parameter_names(module: nn.Module) -> dict[int, list[str]]:
    """Parameters of ``module`` reachable under more than one name (tied weights), by id."""
    names: dict[int, list[str]] = {}
    for n, p in module.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(n)
    return {key: ns for key, ns in names.items() if len(ns) > 1}


def merge_and_unload(model: "AdaptedModel", requantize: bool) -> nn.Module:
    """See :meth:`AdaptedModel.merge_and_unload`."""
    dequantized = _dequantize_adapted_layers(model)
    if requantize and dequantized:
        warnings.warn("re-quantizing merged weights adds quantization error to the learned update; "
                      "compare its outputs before relying on it", stacklevel=3)
    if not model.merged:
        model.merge()
    plain = unwrap(model, keep_trained_heads=True)
    for path, original in dequantized.items():
        if requantize:
            plain.set_submodule(path, handler_for(original).requantize(plain.get_submodule(path), original))
    if not requantize:
        for path, module in list(plain.named_modules()):
            handler = handler_for(module)
            if handler is not None:
                plain.set_submodule(path, handler.dequantize(module))
    return plain


def _dequantize_adapted_layers(model: "AdaptedModel") -> dict[str, nn.Module]:
    """Swap each adapted quantized base layer for its full-precision twin; returns the originals."""
    originals: dict[str, nn.Module] = {}
    for path, layer in model.adapter_layers():
        handler = handler_for(layer.base_layer)
        if handler is None or not layer.mergeable:
            continue
        if layer.merged_adapters:
            raise AdapterError(f"{path} is quantized and merged in place; unmerge() first")
        originals[path] = layer.base_layer
        layer.base_layer = handler.dequantize(layer.base_layer)
    return originals


def unwrap(model: "AdaptedModel", keep_trained_heads: bool) -> nn.Module:
    """Put back every wrapped module (a trained head copy instead, with ``keep_trained_heads``),
    forget all adapters and return the base model."""
    base = model.base_model
    for path, layer in list(model.adapter_layers()):
        replacement = layer.base_layer
        if keep_trained_heads and isinstance(layer, ModulesToSave):
            for n in layer.active_adapters:
                replacement = layer.modules_to_save[n]
                break
        base.set_submodule(path, replacement)
    model._forget_adapters()
    return base
