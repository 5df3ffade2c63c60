"""How LoRA attaches to a model: wrap the targeted layers and add one adapter to each."""

from __future__ import annotations

import re
from typing import Any

from torch import nn

from deltatune.core.layer import wrapped
from deltatune.core.targets import resolve_targets
from deltatune.errors import TargetError
from deltatune.methods.lora.config import LoraConfig
from deltatune.methods.lora.layer import LoraLayer, LoraLinear, linear_kinds, lora_kinds, wrap_with_lora


def pattern_value(patterns: dict[str, Any], path: str, default: Any) -> Any:
    """The value of the first pattern that matches the tail of ``path`` (PEFT's rule), else default."""
    for key, value in patterns.items():
        if re.fullmatch(rf"(?:.*\.)?(?:{key})", path):
            return value
    return default


def _check_dora_targets(model: nn.Module, paths: list[str]) -> None:
    """DoRA is defined here for Linear, Conv1D and Embedding layers; refuse others before wrapping any."""
    for path in paths:
        module = model.get_submodule(path)
        base = module.base_layer if isinstance(module, LoraLayer) else module
        if not isinstance(base, (*linear_kinds(), nn.Embedding)):
            raise TargetError(f"{path} is a {type(base).__name__}; DoRA works on Linear, Conv1D and Embedding "
                              f"layers: exclude it (exclude=[...]) or set dora=False")


class LoraMethod:
    """Injector registered for ``"lora"``."""

    def inject(self, model: nn.Module, config: LoraConfig, name: str) -> list[str]:
        paths = resolve_targets(model, config.targets, kinds=lora_kinds(), layers=config.layers,
                                exclude=config.exclude)
        if config.dora:
            _check_dora_targets(model, paths)
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
        """PEFT wants ``fan_in_fan_out`` set when the adapted layers are GPT-2 Conv1D."""
        conv1d = any(isinstance(layer, LoraLinear) and layer.fan_in_fan_out and name in layer.adapter_names
                     for _, layer in model.adapter_layers())
        return {"fan_in_fan_out": conv1d}
