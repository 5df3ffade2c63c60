"""Base class of every method config: frozen, validated, and serialised with HF PEFT's names.

A config stores the user's intent (``targets=["q", "v"]``). Files store it under the field
names HF PEFT uses (``target_modules``, ``lora_alpha`` ...), so adapter folders move both ways.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import types
import typing
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any, ClassVar

from deltatune.core.patterns import compile_pattern, shown
from deltatune.errors import ConfigError

#: the words a ``layers`` selection may be, besides block indices
LAYER_WORDS = ("all", "lower", "upper", "even", "odd")

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


# --- validation rules, one call per field: each raises "<field> must be <allowed>, got <value>" ---

def require(ok: bool, field: str, value: Any, allowed: str) -> None:
    """Raise :class:`ConfigError` naming ``field``, its bad ``value`` and what is ``allowed``, unless ``ok``."""
    if not ok:
        raise ConfigError(f"{field} must be {allowed}, got {shown(value)}")


def is_number(value: Any) -> bool:
    """A finite int or float; ``True``/``False``, NaN and infinities are not numbers here."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return isinstance(value, int) or math.isfinite(value)


def is_int(value: Any) -> bool:
    """An int; ``True``/``False`` are not (Python counts them as 1 and 0)."""
    return isinstance(value, int) and not isinstance(value, bool)


#: the largest size-like integer a config may hold (ranks, token counts, widths): anything
#: above is a damaged or hostile file, refused before a tensor of that size is allocated
MAX_SIZE = 2**20


def positive_int(field: str, value: Any, *, hint: str = "", none: str = "") -> None:
    """``value`` is an int in [1, :data:`MAX_SIZE`]; with ``none`` (what None stands for), or None."""
    if none and value is None:
        return
    allowed = "a positive integer" + (f" ({hint})" if hint else "") + (f", or None ({none})" if none else "")
    require(is_int(value) and value >= 1, field, value, allowed)
    require(value <= MAX_SIZE, field, value, f"at most {MAX_SIZE}")


def positive_number(field: str, value: Any, *, hint: str = "") -> None:
    """``value`` is an int or float > 0."""
    require(is_number(value) and value > 0, field, value, "a positive number" + (f" ({hint})" if hint else ""))


def fraction(field: str, value: Any, *, hint: str = "") -> None:
    """``value`` is a number in [0, 1), such as a dropout probability."""
    require(is_number(value) and 0 <= value < 1, field, value, "in [0, 1)" + (f" ({hint})" if hint else ""))


def one_of(field: str, value: Any, choices: tuple) -> None:
    """``value`` is one of ``choices``."""
    require(value in choices, field, value, f"one of {choices}")


def module_names(field: str, value: Any, *, words: tuple[str, ...] = (), regex: bool = True,
                 empty: bool = False) -> None:
    """``value`` is None, a list of module names (non-empty strings; an empty list only with
    ``empty``), or, with ``regex``, one string: a regex, or one of ``words`` (``"all-linear"``)."""
    if value is None:
        return
    if regex and isinstance(value, str):
        if value not in words:
            compile_pattern(field, value)
        return
    options = [repr(w) for w in words] + (["a regex string"] if regex else [])
    options.append("a list of module names" if empty else "a non-empty list of module names")
    names = isinstance(value, (list, tuple)) and all(isinstance(v, str) and v for v in value)
    require(names and (empty or len(value) > 0), field, value, _either(options))


def _either(options: list[str]) -> str:
    return options[0] if len(options) == 1 else f"{', '.join(options[:-1])} or {options[-1]}"


def _fits(value: Any, hint: Any) -> bool:
    """Whether ``value`` has the type the field annotation ``hint`` names (after lists became
    tuples). Annotations it does not know (``Any``, callables) accept anything."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return True
    if hint is type(None) or hint is None:
        return value is None
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, a) for a in args)
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return is_int(value)
    if hint is float:
        return is_number(value)
    if hint is str:
        return isinstance(value, str)
    if hint is dict or origin is dict:
        return isinstance(value, dict)
    if origin in (tuple, list, Sequence) or hint in (tuple, list, Sequence):
        if not isinstance(value, (tuple, list)):
            return False
        item = args[0] if args else Any
        return all(_fits(v, item) for v in value)
    return True


def check_field_types(config: "MethodConfig") -> None:
    """Raise :class:`ConfigError` naming the first field whose value has the wrong type for its
    annotation (a string ``"false"`` for a flag, a list for a number ...): files are checked as
    strictly as code, whatever rules a method's ``validate`` has."""
    hints = _field_hints(type(config))
    for f in fields(config):
        value = getattr(config, f.name)
        if f.name in hints and not _fits(value, hints[f.name]):
            raise ConfigError(f"{f.name} must be {_type_name(hints[f.name])}, got {shown(value)}")


@functools.cache
def _field_hints(cls: type) -> dict[str, Any]:
    # resolving string annotations costs more than the rest of a config's construction, and a
    # class's annotations do not change: adapter loading builds several configs per load
    return typing.get_type_hints(cls)


_TYPE_NAMES = {bool: "true or false", int: "an integer", float: "a finite number", str: "a string",
               dict: "a mapping (JSON object)"}


def _type_name(hint: Any) -> str:
    if hint in _TYPE_NAMES:
        return _TYPE_NAMES[hint]
    text = str(hint).replace("typing.", "").replace("collections.abc.", "").replace("NoneType", "None")
    return f"of type {text}"


def layer_selection(field: str, value: Any) -> tuple[int, ...] | str | None:
    """``value`` is None, one of :data:`LAYER_WORDS`, a block index or a list of them; returned with
    one index written as a list of one. Whether the blocks exist is checked against the model."""
    if is_int(value):
        return (value,)
    indices = isinstance(value, (list, tuple)) and all(is_int(v) for v in value)
    require(value is None or value in LAYER_WORDS or indices, field, value,
            f"None, one of {LAYER_WORDS}, a block index or a list of block indices")
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
        try:
            self.validate()  # its rules give the most helpful messages, so they speak first
        except ConfigError:
            raise
        except Exception:  # a rule tripped over a value of the wrong type: name the field instead
            check_field_types(self)
            raise
        check_field_types(self)

    def validate(self) -> None:
        """Raise :class:`ConfigError` for invalid values. Subclasses extend this."""
        module_names("modules_to_save", self.modules_to_save, regex=False, empty=True)

    def replace(self, **changes: Any) -> "MethodConfig":
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def exact_targets(self, targets: list[str]) -> dict[str, Any]:
        """The field changes (for :meth:`replace`) after which the config names exactly the given
        modules and nothing else: used for the saved config, so every reader wraps the same
        modules whatever the original selection. No changes for methods without a module
        selection (:class:`TargetedConfig` has one)."""
        return {}

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
            raise ConfigError(f"cannot build {cls.__name__} from {shown(data)}: {exc}") from None
        except ConfigError as exc:  # name the field as the file does: "lora_alpha (alpha) must be ..."
            text = str(exc)
            for name, key in {**cls.peft_names, "base_model": "base_model_name_or_path"}.items():
                if text.startswith((f"{name} ", f"{name}[")):
                    raise type(exc)(f"{key} ({name}){text[len(name):]}") from None
            raise


@dataclass(frozen=True)
class TargetedConfig(MethodConfig):
    """The module selection every method that adapts chosen modules shares (LoRA, IA3, bottleneck
    adapters, BitFit, diff pruning), with its checks.

    Attributes:
        targets: modules to adapt: names or name suffixes, component aliases (``["q", "v"]``), a
            regex string matched against whole module paths, or one of the method's words
            (``"all-linear"``); ``None`` means the method's default.
        layers: restrict to blocks: a list of indices, or ``"lower"``, ``"upper"``, ``"even"``,
            ``"odd"``, ``"all"``.
        exclude: names (suffixes) or a regex of modules to leave alone.
    """

    #: the words ``targets`` may be besides names and a regex (``"all-linear"``)
    target_words: ClassVar[tuple[str, ...]] = ()

    targets: str | Sequence[str] | None = None
    layers: str | Sequence[int] | int | None = None
    exclude: str | Sequence[str] | None = None

    def validate(self) -> None:
        super().validate()
        object.__setattr__(self, "layers", layer_selection("layers", self.layers))
        if self.targets is None:  # a method whose field default is a selection ("all-linear") means it;
            # a default of None leaves the choice to the method's injector (per architecture or style)
            object.__setattr__(self, "targets", self.__dataclass_fields__["targets"].default)
        module_names("targets", self.targets, words=self.target_words, empty=self.targets_may_be_empty())
        module_names("exclude", self.exclude, empty=True)

    def targets_may_be_empty(self) -> bool:
        """Whether ``targets=[]`` is valid (LoRA's, when it adapts parameters only)."""
        return False

    def exact_targets(self, targets: list[str]) -> dict[str, Any]:
        return {"targets": targets, "layers": None, "exclude": None}
