"""The method protocol and the registry: method name -> (config class, :class:`Method`).

The core never names a method; methods call :func:`register` when their package is imported.
Every call the core makes into a method goes through a hook of :class:`Method`, listed and
defaulted here (docs/architecture.md has the "add a method" recipe).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from deltatune.core.patterns import shown
from deltatune.errors import ConfigError

if TYPE_CHECKING:
    from deltatune.core.model import AdaptedModel
    from deltatune.core.config import MethodConfig
    from deltatune.core.layer import ModelAdapter


class Method(ABC):
    """How one PEFT method attaches to a model. Subclass it, implement :meth:`inject`, and
    override any other hook the method needs; the defaults do nothing."""

    @abstractmethod
    def inject(self, model: nn.Module, config: "MethodConfig", name: str) -> list[str]:
        """Wrap the modules ``config`` targets in ``model`` (the base model) with this method's
        :class:`~deltatune.core.layer.AdapterLayer` and add adapter ``name`` to each wrapper.

        Returns the paths wrapped, in model order (the core indexes them and saves them as the
        exact ``target_modules``). Raise :class:`~deltatune.errors.ConfigError` or
        :class:`~deltatune.errors.TargetError` before wrapping anything when the model cannot take
        the adapter. Methods that act on the inputs, not on layers, return ``[]``.
        """

    def build_model_adapter(self, model: nn.Module, config: "MethodConfig", name: str) -> "ModelAdapter | None":
        """A :class:`~deltatune.core.layer.ModelAdapter` that rewrites every call's inputs and
        outputs (prompt and prefix tuning), or None (the default) for methods that wrap layers."""
        return None

    def extra_trainable(self, model: nn.Module, config: "MethodConfig", paths: list[str]) -> list[str]:
        """Names of base-model parameters the adapter also trains (LoRA's ``bias="all"``), given
        the wrapped ``paths``. Each adapter keeps its own values of them
        (:mod:`deltatune.core.shared_params`). Default: none."""
        return []

    def training_penalty(self, model: "AdaptedModel") -> torch.Tensor | None:
        """A regularisation term the training loop adds to the loss while an adapter of this
        method is active (diff pruning's L0 term), or None (the default)."""
        return None

    def file_extras(self, model: "AdaptedModel", name: str) -> dict[str, Any]:
        """Fields resolved against the model that adapter_config.json carries besides the config
        (PEFT writes prompt tuning's ``num_layers``, for one). Default: none."""
        return {}


@dataclass(frozen=True)
class MethodSpec:
    """A registered method: its name (the ``type:`` in recipes), config class and implementation."""

    name: str
    config_cls: type["MethodConfig"]
    method: Method


_METHODS: dict[str, MethodSpec] = {}


def register(name: str, config_cls: type["MethodConfig"], method: Method) -> None:
    """Make a method available to :func:`deltatune.attach`, adapter files and recipes."""
    if not isinstance(method, Method):
        raise ConfigError(f"method {name!r} must be registered with a deltatune.core.registry.Method "
                          f"instance, got {type(method).__name__}; subclass Method")
    if getattr(config_cls, "method", None) != name:
        raise ConfigError(f"{config_cls.__name__}.method is {getattr(config_cls, 'method', None)!r}, but it is "
                          f"registered as {name!r}; the two must match (files and recipes name the method by it)")
    _METHODS[name] = MethodSpec(name, config_cls, method)


def unregister(name: str) -> None:
    """Forget method ``name`` (for methods defined in a notebook or a test)."""
    _METHODS.pop(name, None)


def get(name: str) -> MethodSpec:
    """The method registered as ``name``."""
    if not isinstance(name, str):
        raise ConfigError(f"a method name is a string such as 'lora', got {type(name).__name__}")
    try:
        return _METHODS[name]
    except KeyError:
        raise ConfigError(f"unknown method {shown(name)}; available: {', '.join(sorted(_METHODS))}") from None


def for_config(config: "MethodConfig") -> MethodSpec:
    """The method that ``config`` (an instance of a registered config class) belongs to."""
    return get(type(config).method)


def for_file(data: dict[str, Any]) -> MethodSpec:
    """The method an adapter_config.json describes (deltatune's own key, else PEFT's peft_type)."""
    if "deltatune_method" in data:
        return get(data["deltatune_method"])
    peft_type = data.get("peft_type")
    for spec in _METHODS.values():
        if peft_type and spec.config_cls.peft_type == peft_type:
            return spec
    known = sorted(s.config_cls.peft_type for s in _METHODS.values() if s.config_cls.peft_type)
    raise ConfigError(f"adapter_config.json has peft_type={shown(peft_type)}; deltatune reads {', '.join(known)}")


def names() -> list[str]:
    """The registered method names, sorted."""
    return sorted(_METHODS)
