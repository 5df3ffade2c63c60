"""Hot swap: replace a loaded LoRA adapter's weights in place from a file, without rebuilding
modules (so compiled graphs and the server's references stay valid)."""

from __future__ import annotations

import os
from typing import Callable

from deltatune.core.layer import ModulesToSave
from deltatune.core.model import AdaptedModel
from deltatune.core.state import read_adapter, split_by_layer
from deltatune.errors import AdapterError, AdapterFileError
from deltatune.methods.lora import LoraConfig, LoraLayer
from deltatune.methods.lora.experts import LoraExperts
from deltatune.methods.lora.factors import as_matrix
from deltatune.methods.lora.init import is_data_init
from deltatune.methods.lora.layer import lora_scaling
from deltatune.methods.lora.method import pattern_value


def hot_swap(model: AdaptedModel, name: str, directory: str | os.PathLike) -> None:
    """Overwrite adapter ``name``'s LoRA factors with those in ``directory``.

    The file must adapt the same modules with the same or a smaller rank (on every LoRA layer
    kind: Linear, Conv1D, Embedding, Conv2d; fused expert weights at the same rank); a smaller
    rank is zero-padded, and the file's scale (its alpha and rank) is folded into B, both exact.
    Trained head copies are replaced too. Everything is checked before the first tensor is written.
    """
    model._check(name)
    target = model.configs[name]
    if not isinstance(target, LoraConfig):
        raise AdapterError(f"hot swap replaces LoRA adapters, and {name!r} is a {type(target).__name__}; load the "
                           f"new file under another name and remove this one")
    if target.dora or is_data_init(target.init):
        raise AdapterError(f"hot swap replaces plain LoRA factors, and {name!r} is a DoRA/PiSSA/OLoRA adapter; "
                           f"load the new file under another name and remove this one")
    data, tensors = read_adapter(directory)
    if data.get("peft_type") != "LORA":
        raise AdapterFileError(f"{directory} is not a LoRA adapter; hot swap replaces LoRA weights only")
    incoming = LoraConfig.from_dict(data)
    per_layer, extras, model_level = split_by_layer(model, name, tensors)
    if extras or model_level:
        raise AdapterFileError("hot swap replaces LoRA factors and head copies; this file also trains biases")
    layers = dict(model.adapter_layers())
    writes = []
    for path, state in per_layer.items():
        layer = layers[path]
        if isinstance(layer, LoraLayer):
            scale = lora_scaling(pattern_value(incoming.rank_pattern, path, incoming.r),
                                 pattern_value(incoming.alpha_pattern, path, incoming.alpha, "alpha_pattern"),
                                 incoming.use_rslora)
            writes.append(_planned_lora_write(layer, name, path, state, scale))
        else:  # a head copy: same keys and shapes, checked by the layer
            writes.append(lambda layer=layer, state=state, path=path: layer.load_adapter_state(name, state, where=path))
    for write in writes:
        write()


def _planned_lora_write(layer: LoraLayer, name: str, path: str, state: dict, scale: float) -> Callable[[], None]:
    """Check the file's tensors for one LoRA layer and return the write that swaps them in."""
    state = layer._without_base_copies(state, path)
    ratio = scale / layer.scaling[name]
    if isinstance(layer, LoraExperts):  # factors interleaved per expert: same keys and shapes only
        current = layer.adapter_state(name)
        if set(state) != set(current) or any(state[k].shape != current[k].shape for k in current):
            raise AdapterFileError(f"{path}: the file's fused expert factors do not fit the loaded ones (keys "
                                   f"{sorted(state)}); fused expert weights are swapped at the same rank only")
        return lambda: (layer.load_adapter_state(name, state, where=path), layer.rescale(name, ratio))
    # A's key, then B's (the order of adapter_attrs): lora_A.weight/lora_B.weight, lora_embedding_A/B
    keys = tuple(k for k in layer.adapter_state(name) if k != "lora_magnitude_vector")
    if set(state) != set(keys):
        raise AdapterFileError(f"{path}: the file has {sorted(state) or 'no tensors'}, not this layer's LoRA "
                               f"factors {list(keys)}")
    a, b = (as_matrix(state[k]) for k in keys)
    try:
        layer.check_factors(name, a, b)
    except AdapterError as exc:
        raise AdapterFileError(f"{path}: the file's {exc}") from None
    return lambda: (layer.set_factors(name, a, b), layer.rescale(name, ratio))
