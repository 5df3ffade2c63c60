"""Method registry: method name -> (config class, method implementation).

The core never names a method; methods call :func:`register` when their package is imported.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from deltatune.core.patterns import shown
from deltatune.errors import ConfigError

if TYPE_CHECKING:
    from deltatune.core.config import MethodConfig


@dataclass(frozen=True)
class MethodSpec:
    """What the core needs to know of a method."""

    name: str
    config_cls: type["MethodConfig"]
    #: object with ``inject(model, config, adapter_name) -> list[str]`` (wrapped module paths)
    injector: Any


_METHODS: dict[str, MethodSpec] = {}


def register(name: str, config_cls: type["MethodConfig"], injector: Any) -> None:
    """Make a method available to :func:`deltatune.attach`, adapter files and recipes."""
    _METHODS[name] = MethodSpec(name, config_cls, injector)


def _ensure_loaded() -> None:
    import deltatune.methods  # noqa: F401  (methods register on import)


def get(name: str) -> MethodSpec:
    """The method registered as ``name``."""
    _ensure_loaded()
    if not isinstance(name, str):
        raise ConfigError(f"a method name is a string such as 'lora', got {type(name).__name__}")
    try:
        return _METHODS[name]
    except KeyError:
        raise ConfigError(f"unknown method {shown(name)}; available: {', '.join(sorted(_METHODS))}") from None


def for_config(config: "MethodConfig") -> MethodSpec:
    return get(type(config).method)


def for_file(data: dict[str, Any]) -> MethodSpec:
    """The method an adapter_config.json describes (deltatune's own key, else PEFT's peft_type)."""
    _ensure_loaded()
    if "deltatune_method" in data:
        return get(data["deltatune_method"])
    peft_type = data.get("peft_type")
    for spec in _METHODS.values():
        if peft_type and spec.config_cls.peft_type == peft_type:
            return spec
    known = sorted(s.config_cls.peft_type for s in _METHODS.values() if s.config_cls.peft_type)
    raise ConfigError(f"adapter_config.json has peft_type={shown(peft_type)}; deltatune reads {', '.join(known)}")


def names() -> list[str]:
    _ensure_loaded()
    return sorted(_METHODS)
