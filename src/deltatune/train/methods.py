"""What a recipe's ``method:`` section trains.

Any registered method (``{type: lora, r: 8, ...}``) is looked up in the registry and attached,
so new methods need no change here; the ``full`` and ``head-only`` baselines are registered
methods too (``deltatune.methods.freeze``). Ways of training that are not adapters (the
``intrinsic`` subspace of :mod:`deltatune.experiments`) add themselves with
:func:`register_training_method`, so that train never imports the packages built on it.
"""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path
from typing import Callable

from torch import nn

from deltatune.api import attach
from deltatune.core import registry
from deltatune.core.config import MethodConfig
from deltatune.errors import ConfigError
from deltatune.train.files import replace_dir
from deltatune.train.recipe import coerce


class TrainMethod:
    """How to make a base model trainable and where the result is saved."""

    name: str = ""
    #: the folder under output_dir that :meth:`save` writes
    result: str = "adapter"

    def apply(self, model: nn.Module) -> nn.Module:
        """The model to train (parameters to train have ``requires_grad``)."""
        raise NotImplementedError

    def save(self, model: nn.Module, folder: Path) -> None:
        """Write the trained result into ``folder``."""
        raise NotImplementedError

    def describe(self) -> dict:
        return {"type": self.name}

    def summary_facts(self, model: nn.Module) -> dict:
        """Facts about the trained model the run's summary should carry (none by default)."""
        return {}


class AdapterMethod(TrainMethod):
    """A registered PEFT method, attached with :func:`deltatune.attach`; saved as a
    PEFT-compatible adapter folder."""

    def __init__(self, config: MethodConfig) -> None:
        self.config = config
        self.name = type(config).method

    def apply(self, model: nn.Module) -> nn.Module:
        return attach(model, self.config)

    def save(self, model: nn.Module, folder: Path) -> None:
        replace_dir(folder, lambda tmp: model.save(str(tmp)))

    def describe(self) -> dict:
        return {"type": self.name, **{k: v for k, v in self.config.to_dict().items()}}


def _numbers_from_text(config_cls: type, fields: dict) -> dict:
    """``fields`` with text values of purely numeric options read as numbers: YAML 1.1 reads
    ``5e-2`` (no dot) as a string, and the method configs want numbers."""
    hints = typing.get_type_hints(config_cls)
    out = dict(fields)
    for key, value in fields.items():
        args = typing.get_args(hints[key]) or (hints[key],)
        if isinstance(value, str) and str not in args and (int in args or float in args):
            out[key] = coerce(value, hints[key], f"method.{key}")
    return out


_OTHER_METHODS: dict[str, Callable[[dict], TrainMethod]] = {}


def register_training_method(kind: str, from_section: Callable[[dict], TrainMethod]) -> None:
    """Let recipes say ``method: {type: <kind>, ...}`` for a way of training that is not a
    registered adapter method; ``from_section`` gets the section's other fields."""
    _OTHER_METHODS[kind] = from_section


def resolve(section: dict) -> TrainMethod:
    """The :class:`TrainMethod` a recipe's ``method`` section describes."""
    fields = dict(section)
    kind = str(fields.pop("type"))
    if kind in registry.names():
        spec = registry.get(kind)
        valid = [f.name for f in dataclasses.fields(spec.config_cls) if f.name not in ("task_type", "base_model")]
        unknown = sorted(set(fields) - set(valid))
        if unknown:
            raise ConfigError(f"unknown {kind} option{'s' if len(unknown) > 1 else ''} {', '.join(unknown)} in "
                              f"method; valid options: {', '.join(valid)}")
        return AdapterMethod(spec.config_cls(**_numbers_from_text(spec.config_cls, fields)))
    if kind in _OTHER_METHODS:
        return _OTHER_METHODS[kind](fields)
    hint = "" if "intrinsic" in _OTHER_METHODS else " (intrinsic: import deltatune.experiments first)"
    raise ConfigError(f"unknown method type {kind!r}; available: {', '.join([*registry.names(), *_OTHER_METHODS])}"
                      f"{hint}")
