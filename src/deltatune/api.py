"""The two entry points: attach a new adapter, or load a saved one."""

from __future__ import annotations

import os

from torch import nn

from deltatune.core.config import MethodConfig
from deltatune.core.model import AdaptedModel


def _adapted(base: nn.Module) -> AdaptedModel:
    return base if isinstance(base, AdaptedModel) else AdaptedModel(base)


def attach(base: nn.Module, config: MethodConfig, name: str = "default") -> AdaptedModel:
    """Freeze ``base`` and add a new trainable adapter ``name`` to it, made active.

    ``base`` is modified in place (its targeted layers are wrapped); ``unload()`` undoes that.
    """
    model = _adapted(base)
    model.add(config, name, trainable=True)
    return model.use(name)


def load(base: nn.Module, directory: str | os.PathLike, name: str = "default", *,
         trainable: bool = False, allow_nonfinite: bool = False) -> AdaptedModel:
    """Load the adapter folder ``directory`` (deltatune's or HF PEFT's) onto ``base``, made active.

    With ``trainable=True`` its parameters get gradients, to continue training. Weights with NaN
    or Inf values are refused unless ``allow_nonfinite``. If loading fails, ``base`` is left
    exactly as it was (modules and ``requires_grad`` flags).
    """
    if isinstance(base, AdaptedModel):
        return base.load(directory, name, trainable=trainable, allow_nonfinite=allow_nonfinite).use(name)
    flags = [(p, p.requires_grad) for p in base.parameters()]
    model = AdaptedModel(base)
    try:
        model.load(directory, name, trainable=trainable, allow_nonfinite=allow_nonfinite)
    except BaseException:
        model.unload()
        for p, flag in flags:
            p.requires_grad_(flag)
        raise
    return model.use(name)
