"""How LoRA attaches to a model: wrap the targeted layers and add one adapter to each."""

from __future__ import annotations

import re
from typing import Any

from torch import nn

from deltatune.core.layer import linear_layout, wrapped
from deltatune.core.targets import resolve_targets
from deltatune.errors import ConfigError, TargetError
from deltatune.methods.lora.config import LoraConfig
from deltatune.methods.lora.init import converted_file_fields, is_data_init
from deltatune.methods.lora.layer import LoraLayer, LoraLinear, linear_kinds, lora_kinds, wrap_with_lora


def pattern_value(patterns: dict[str, Any], path: str, default: Any) -> Any:
    """The value of the first pattern that matches the tail of ``path`` (PEFT's rule), else default."""
    for key, value in patterns.items():
        if re.fullmatch(rf"(?:.*\.)?(?:{key})", path):
            return value
    return default


def _check_variant_targets(model: nn.Module, paths: list[str], config: LoraConfig) -> None:
    """DoRA is defined here for Linear, Conv1D and Embedding layers, PiSSA/OLoRA for Linear and
    Conv1D; refuse other targets before wrapping any."""
    rules = []
    if config.dora:
        rules.append(("DoRA", "Linear, Conv1D and Embedding", (*linear_kinds(), nn.Embedding), "set dora=False"))
    if is_data_init(config.init):
        rules.append((f"init={config.init!r}", "Linear and Conv1D", linear_kinds(), "use init='kaiming'"))
    for path in paths:
        module = model.get_submodule(path)
        base = module.base_layer if isinstance(module, LoraLayer) else module
        for what, names, kinds, fix in rules:
            if not isinstance(base, kinds):
                raise TargetError(f"{path} is a {type(base).__name__}; {what} works on {names} layers: "
                                  f"exclude it (exclude=[...]) or {fix}")
        r = pattern_value(config.rank_pattern, path, config.r)
        if is_data_init(config.init) and r > min(linear_layout(base)[1:]):
            raise ConfigError(f"init={config.init!r} needs r <= min(in, out) = {min(linear_layout(base)[1:])} at "
                              f"{path}, got r={r}; lower r (rank_pattern) or exclude the layer")


class LoraMethod:
    """Injector registered for ``"lora"``."""

    def inject(self, model: nn.Module, config: LoraConfig, name: str) -> list[str]:
        paths = resolve_targets(model, config.targets, kinds=lora_kinds(), layers=config.layers,
                                exclude=config.exclude)
        _check_variant_targets(model, paths, config)
        for path in paths:
            module = wrapped(model, path, LoraLayer, "LoRA", make=lambda m, p=path: wrap_with_lora(m, p))
            module.add_adapter(name, r=pattern_value(config.rank_pattern, path, config.r),
                               alpha=pattern_value(config.alpha_pattern, path, config.alpha),
                               dropout=config.dropout, init=config.init, use_rslora=config.use_rslora,
                               use_dora=config.dora)
        return paths

    def extra_trainable(self, model: nn.Module, config: LoraConfig, paths: list[str]) -> list[str]:
        """Names of base parameters that train and save with the adapter (the ``bias`` option)."""
        if config.bias == "all":
            return [n for n, _ in model.named_parameters() if n.endswith(".bias") and "lora_" not in n
                    and ".modules_to_save." not in n]
        if config.bias == "lora_only":
            return [f"{p}.base_layer.bias" for p in paths
                    if getattr(model.get_submodule(p).base_layer, "bias", None) is not None]
        return []

    def file_extras(self, model, name: str) -> dict[str, Any]:
        """PEFT wants ``fan_in_fan_out`` set when the adapted layers are GPT-2 Conv1D; PiSSA/OLoRA
        adapters are saved as the plain rank-2r LoRA they equal (see init.py)."""
        conv1d = any(isinstance(layer, LoraLinear) and layer.fan_in_fan_out and name in layer.adapter_names
                     for _, layer in model.adapter_layers())
        config = model.configs[name]
        return {"fan_in_fan_out": conv1d, **(converted_file_fields(config) if is_data_init(config.init) else {})}
