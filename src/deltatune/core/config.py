"""Base class of every method config: frozen, validated, and serialised with HF PEFT's names.

A config stores the user's intent (``targets=["q", "v"]``). Files store it under the field
names HF PEFT uses (``target_modules``, ``lora_alpha`` ...), so adapter folders move both ways.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from dataclasses import dataclass, fields
from typing import Any, ClassVar

from deltatune.errors import ConfigError

# PEFT config keys that never change what an adapter computes; read and dropped silently.
_PEFT_BOOKKEEPING = frozenset({
    "peft_type", "peft_version", "revision", "inference_mode", "auto_mapping", "megatron_core",
    "megatron_config", "layers_pattern", "fan_in_fan_out", "qalora_group_size", "loftq_config",
    "ensure_weight_tying", "exclude_modules_pattern",
})


def _freeze(value: Any) -> Any:
    """Lists become tuples and dicts stay dicts, so a frozen config cannot be mutated by accident."""
    if isinstance(value, list):
        return tuple(_freeze(v) for v in value)
    return value


def _thaw(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_thaw(v) for v in value]
    if isinstance(value, dict):
        return {k: _thaw(v) for k, v in value.items()}
    return value


@dataclass(frozen=True)
class MethodConfig:
    """Fields shared by every method.

    Attributes:
        modules_to_save: modules (by name suffix) trained as full copies next to the adapter,
            e.g. a classification head. ``None`` picks the head automatically for sequence
            classification models; ``[]`` turns that off.
        task_type: PEFT task type (``SEQ_CLS``, ``CAUSAL_LM`` ...); filled in from the model.
        base_model: name or path of the base model; filled in from the model when saving.
    """

    #: registry name of the method, also the ``type:`` value in recipes.
    method: ClassVar[str] = ""
    #: ``peft_type`` in adapter_config.json, or None where HF PEFT has no such method.
    peft_type: ClassVar[str | None] = None
    #: our field name -> PEFT's JSON key, for fields whose names differ.
    peft_names: ClassVar[dict[str, str]] = {}
    #: PEFT keys whose non-empty value changes the computation in a way we do not implement.
    peft_unsupported: ClassVar[frozenset[str]] = frozenset()

    modules_to_save: tuple[str, ...] | None = None
    task_type: str | None = None
    base_model: str | None = None

    def __post_init__(self) -> None:
        for f in fields(self):
            object.__setattr__(self, f.name, _freeze(getattr(self, f.name)))
        self.validate()

    def validate(self) -> None:
        """Raise :class:`ConfigError` for invalid values. Subclasses extend this."""
        if self.modules_to_save is not None and not all(isinstance(m, str) for m in self.modules_to_save):
            raise ConfigError(f"modules_to_save must be a list of module names, got {self.modules_to_save!r}")

    def replace(self, **changes: Any) -> "MethodConfig":
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def with_targets(self, targets: list[str]) -> "MethodConfig":
        """A copy whose ``targets`` name exactly the given modules and nothing else: used for the
        saved config, so every reader wraps the same modules whatever the original selection."""
        names = {f.name for f in fields(self)}
        cleared = {k: None for k in ("layers", "exclude") if k in names}
        return self.replace(targets=targets, **cleared) if "targets" in names else self

    # --- serialisation -------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The adapter_config.json content, with PEFT's key names."""
        out: dict[str, Any] = {}
        if self.peft_type:
            out["peft_type"] = self.peft_type
        else:  # a method HF PEFT does not have: name it in deltatune's own key
            out["deltatune_method"] = self.method
        for f in fields(self):
            key = "base_model_name_or_path" if f.name == "base_model" else self.peft_names.get(f.name, f.name)
            out[key] = _thaw(getattr(self, f.name))
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "MethodConfig":
        """Build a config from adapter_config.json content (deltatune's or HF PEFT's).

        Unknown keys are a warning; PEFT features that would change the result but that we do
        not implement (DoRA, for one) are a :class:`ConfigError`.
        """
        to_field = {v: k for k, v in cls.peft_names.items()}
        to_field["base_model_name_or_path"] = "base_model"
        names = {f.name for f in fields(cls)}
        kwargs: dict[str, Any] = {}
        unknown: list[str] = []
        for key, value in data.items():
            name = to_field.get(key, key)
            if name in names:
                kwargs[name] = value
            elif key in cls.peft_unsupported and value not in (None, False, {}, [], ""):
                raise ConfigError(
                    f"this adapter sets {key}={value!r}, a PEFT feature deltatune does not implement; "
                    f"retrain without it or load it with the peft library")
            elif key in _PEFT_BOOKKEEPING or key == "deltatune_method" or value in (None, False, {}, [], ""):
                continue
            else:
                unknown.append(key)
        if unknown:
            warnings.warn(f"{cls.__name__}: ignoring unknown config keys {sorted(unknown)}", stacklevel=2)
        try:
            return cls(**kwargs)
        except TypeError as exc:  # pragma: no cover - dataclass signature problems
            raise ConfigError(f"cannot build {cls.__name__} from {data!r}: {exc}") from None
