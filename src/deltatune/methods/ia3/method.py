"""How (IA)^3 attaches to a model: resolve targets and feed-forward modules, wrap, add vectors."""

from __future__ import annotations

from typing import Any

from torch import nn

from deltatune.core.layer import linear_kinds
from deltatune.core.wrapping import wrapped
from deltatune.core.registry import Method
from deltatune.core.targets import compact_targets, resolve_targets
from deltatune.errors import TargetError
from deltatune.methods.ia3.config import IA3Config
from deltatune.methods.ia3.layer import IA3Linear

DEFAULT_TARGETS = ("k", "v", "down")
DEFAULT_FEEDFORWARD = ("down",)


def feedforward_paths(model: nn.Module, config: IA3Config, targeted: list[str]) -> set[str]:
    """Which of the ``targeted`` paths get their input (not output) rescaled."""
    if config.feedforward is not None and not isinstance(config.feedforward, str) and not config.feedforward:
        return set()
    if config.feedforward is None:
        try:
            chosen = resolve_targets(model, DEFAULT_FEEDFORWARD, kinds=(nn.Module,))
        except TargetError:  # the architecture has no known feed-forward down projection
            return set()
        return set(chosen) & set(targeted)
    chosen = set(resolve_targets(model, config.feedforward, kinds=(nn.Module,))) & set(targeted)
    if not chosen:
        raise TargetError(f"IA3 feedforward {config.feedforward!r} selects none of the targeted modules "
                          f"({', '.join(compact_targets(model, targeted))}); it must name a subset of the targets")
    return chosen


class IA3Method(Method):
    """Registered for ``"ia3"``."""

    def inject(self, model: nn.Module, config: IA3Config, name: str) -> list[str]:
        paths = resolve_targets(model, config.targets, kinds=linear_kinds(), layers=config.layers,
                                exclude=config.exclude, default=DEFAULT_TARGETS)
        feedforward = feedforward_paths(model, config, paths)
        for path in paths:
            wrapped(model, path, IA3Linear, "IA3").add_adapter(name, feedforward=path in feedforward, init=config.init)
        return paths

    def file_extras(self, model, name: str) -> dict[str, Any]:
        """Target and feed-forward module names as PEFT reads them, and ``fan_in_fan_out`` for
        GPT-2 Conv1D.

        PEFT insists that ``feedforward_modules`` be a subset of ``target_modules`` by name, and
        tests a feed-forward name by a plain ``path.endswith(name)``; so the two groups of paths
        are named separately and checked against that rule.
        """
        base = model.base_model
        layers = [(p, layer) for p, layer in model.adapter_layers()
                  if isinstance(layer, IA3Linear) and name in layer.adapter_names]
        feedforward = [p for p, layer in layers if layer.feedforward[name]]
        scaled = [p for p, layer in layers if not layer.feedforward[name]]
        ff_names = compact_targets(base, feedforward) if feedforward else []
        if any(p.endswith(n) for p in scaled for n in ff_names):
            ff_names = sorted(feedforward)
        out_names = compact_targets(base, scaled) if scaled else []
        return {"target_modules": sorted(set(out_names) | set(ff_names)), "feedforward_modules": ff_names,
                "fan_in_fan_out": any(layer.fan_in_fan_out for _, layer in layers)}
