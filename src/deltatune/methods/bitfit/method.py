"""How BitFit attaches: pick the selected modules that have a bias and wrap each one."""

from __future__ import annotations

from torch import nn

from deltatune.core.archspec import head_names
from deltatune.core.layer import ModulesToSave, linear_kinds
from deltatune.core.wrapping import wrapped
from deltatune.core.registry import Method
from deltatune.core.targets import resolve_targets, visible_modules
from deltatune.errors import ConfigError
from deltatune.methods.bitfit.config import BitFitConfig
from deltatune.methods.bitfit.layer import BitFitLayer, bitfit_kinds


def _has_bias(module: nn.Module) -> bool:
    return isinstance(getattr(module, "bias", None), nn.Parameter)


def _candidates(model: nn.Module, *, norms: bool) -> list[str]:
    """Paths of every LayerNorm (``norms``) or every linear layer with a bias, heads and
    modules-to-save left out."""
    heads = head_names(model)
    kinds = (nn.LayerNorm,) if norms else linear_kinds()
    return [p for p, m in visible_modules(model).items()
            if isinstance(m, kinds) and _has_bias(m) and p not in heads
            and not any(p.startswith(h + ".") for h in heads)
            and not isinstance(model.get_submodule(p), ModulesToSave)]


def bias_paths(model: nn.Module, config: BitFitConfig) -> list[str]:
    """The modules whose bias ``config`` trains, in model order (empty when none has a bias)."""
    def select(targets, layers=None) -> set[str]:
        if not targets:
            return set()
        return set(resolve_targets(model, targets, kinds=bitfit_kinds(), layers=layers, exclude=config.exclude))

    targets = _candidates(model, norms=False) if config.targets == "all" else config.targets
    chosen = select(targets)
    if config.layer_norms:
        chosen |= select(_candidates(model, norms=True))
    modules = visible_modules(model)
    paths = [p for p in modules if p in chosen and _has_bias(modules[p])]
    if paths and config.layers is not None:  # last, so an empty layer selection names itself
        kept = select(paths, config.layers)
        paths = [p for p in paths if p in kept]
    return paths


class BitFitMethod(Method):
    """Registered for ``"bitfit"``."""

    def inject(self, model: nn.Module, config: BitFitConfig, name: str) -> list[str]:
        paths = bias_paths(model, config)
        if not paths:
            raise ConfigError(
                f"BitFit targets={config.targets!r} (layer_norms={config.layer_norms}) selects no bias term in "
                f"{type(model).__name__}: its selected modules have bias=None. Target modules that have a bias, "
                f"or use a method that adapts weights (LoRA, IA3)")
        for path in paths:
            wrapped(model, path, BitFitLayer, "BitFit").add_adapter(name)
        return paths
