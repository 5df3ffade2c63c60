"""How LoRA attaches to a model: wrap the targeted layers and add one adapter to each."""

from __future__ import annotations

from typing import Any

from torch import nn

from deltatune.core.layer import ModulesToSave, linear_layout
from deltatune.core.wrapping import wrapped
from deltatune.core.patterns import fullmatch, tail_pattern
from deltatune.core.registry import Method
from deltatune.core.targets import resolve_parameters, resolve_targets
from deltatune.errors import ConfigError, TargetError
from deltatune.methods.lora.experts import LoraExperts
from deltatune.methods.lora.config import LoraConfig
from deltatune.methods.lora.init import converted_file_fields, is_data_init
from deltatune.methods.lora.layer import LoraLayer, LoraLinear, linear_kinds, lora_kinds, wrap_with_lora


def pattern_value(patterns: dict[str, Any], path: str, default: Any, field: str = "rank_pattern") -> Any:
    """The value of the first pattern that matches the tail of ``path`` (PEFT's rule), else default."""
    for key, value in patterns.items():
        if fullmatch(f"{field} key {key!r}", tail_pattern(key), path):
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
    if not rules:  # plain LoRA: nothing to check, and no module look-ups on every load
        return
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


class LoraMethod(Method):
    """Registered for ``"lora"``."""

    def inject(self, model: nn.Module, config: LoraConfig, name: str) -> list[str]:
        paths = resolve_targets(model, config.targets, kinds=lora_kinds(), layers=config.layers,
                                exclude=config.exclude, parameters=True)
        _check_variant_targets(model, paths, config)
        for path in paths:
            module = wrapped(model, path, LoraLayer, "LoRA", make=lambda m, p=path: wrap_with_lora(m, p))
            module.add_adapter(name, r=pattern_value(config.rank_pattern, path, config.r),
                               alpha=pattern_value(config.alpha_pattern, path, config.alpha, "alpha_pattern"),
                               dropout=config.dropout, init=config.init, use_rslora=config.use_rslora,
                               use_dora=config.dora)
        return paths + self._inject_expert_parameters(model, config, name)

    def _inject_expert_parameters(self, model: nn.Module, config: LoraConfig, name: str) -> list[str]:
        by_module: dict[str, list[str]] = {}
        for param_path in resolve_parameters(model, config.targets, config.target_parameters, config.layers):
            module_path, _, param_name = param_path.rpartition(".")
            by_module.setdefault(module_path, []).append(param_name)
        if by_module and (config.dora or is_data_init(config.init)):
            raise TargetError(f"{next(iter(by_module))} holds fused expert weights, which take plain LoRA only "
                              f"(not DoRA or init={config.init!r}, as in peft): exclude them or use the plain variant")
        for path, names in by_module.items():
            module = wrapped(model, path, LoraExperts, "LoRA", make=lambda m, n=names: LoraExperts(m, n), exact=True)
            if set(module.param_names) != set(names):
                raise TargetError(f"{path}: every adapter must adapt the same expert weights "
                                  f"({', '.join(module.param_names)}), as in peft")
            module.add_adapter(name, r=pattern_value(config.rank_pattern, path, config.r),
                               alpha=pattern_value(config.alpha_pattern, path, config.alpha, "alpha_pattern"),
                               dropout=config.dropout, init=config.init, use_rslora=config.use_rslora)
        return list(by_module)

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
        """PEFT wants ``fan_in_fan_out`` set when the adapted layers are GPT-2 Conv1D, and the
        adapted fused expert weights as ``target_parameters`` (their full paths); PiSSA/OLoRA
        adapters are saved as the plain rank-2r LoRA they equal (see init.py)."""
        layers = [(p, layer) for p, layer in model.adapter_layers() if name in layer.adapter_names]
        conv1d = any(isinstance(layer, LoraLinear) and layer.fan_in_fan_out for _, layer in layers)
        config = model.configs[name]
        extras: dict[str, Any] = {"fan_in_fan_out": conv1d,
                                  **(converted_file_fields(config) if is_data_init(config.init) else {})}
        experts = [f"{p}.{n}" for p, layer in layers if isinstance(layer, LoraExperts) for n in layer.param_names]
        if experts:
            extras["target_parameters"] = experts
            if all(isinstance(layer, (LoraExperts, ModulesToSave)) for _, layer in layers):
                extras["target_modules"] = []
        return extras
