"""Hot swap: replace a loaded LoRA adapter's weights in place from a file, without rebuilding
modules (so compiled graphs and the server's references stay valid)."""

from __future__ import annotations

import os

import torch

from deltatune.core.model import AdaptedModel
from deltatune.core.state import read_adapter, split_by_layer
from deltatune.errors import AdapterError, AdapterFileError
from deltatune.methods.lora import LoraConfig, LoraLinear
from deltatune.methods.lora.layer import lora_scaling
from deltatune.methods.lora.init import is_data_init
from deltatune.methods.lora.method import pattern_value


def hot_swap(model: AdaptedModel, name: str, directory: str | os.PathLike) -> None:
    """Overwrite adapter ``name``'s LoRA factors with those in ``directory``.

    The file must adapt the same modules with the same or a smaller rank; a smaller rank is
    zero-padded and its scale folded into B, which is exact. Trained head copies are replaced
    too. LoRA factors are all checked before the first tensor is written.
    """
    model._check(name)
    target = model.configs[name]
    if isinstance(target, LoraConfig) and (target.dora or is_data_init(target.init)):
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
    plan = []
    for path, state in per_layer.items():
        layer = layers[path]
        if not isinstance(layer, LoraLinear):
            plan.append((layer, path, state, None))
            continue
        if set(state) != {"lora_A.weight", "lora_B.weight"}:
            raise AdapterFileError(f"{path}: the file has {sorted(state) or 'no tensors'}, not this layer's LoRA factors")
        a, b = state["lora_A.weight"], state["lora_B.weight"]
        r_new, r_old = a.shape[0], layer.r[name]
        want_a, want_b = (r_old, layer.in_features), (layer.out_features, r_old)
        if r_new > r_old or a.shape[1] != want_a[1] or tuple(b.shape) != (want_b[0], r_new):
            raise AdapterFileError(f"{path}: file factors {tuple(a.shape)} / {tuple(b.shape)} do not fit the loaded "
                                   f"{want_a} / {want_b} (rank may only shrink)")
        scale = lora_scaling(r_new, pattern_value(incoming.alpha_pattern, path, incoming.alpha), incoming.use_rslora)
        plan.append((layer, path, a, b * (scale / layer.scaling[name])))
    with torch.no_grad():
        for layer, path, a, b in plan:
            if b is None:  # a head copy: same keys and shapes, checked by the layer
                layer.load_adapter_state(name, a, where=path)
                continue
            weight_a, weight_b = layer.lora_A[name].weight, layer.lora_B[name].weight
            weight_a.zero_()
            weight_b.zero_()
            weight_a[: a.shape[0]].copy_(a)
            weight_b[:, : a.shape[0]].copy_(b)
