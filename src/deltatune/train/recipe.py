"""Training recipes: a short YAML file (or a dict) resolved into typed, validated sections.

```yaml
model: minilm
task: seq-cls
data: {train: train.tsv, eval: dev.tsv, text: sentence, label: label}
method: {type: lora, r: 8, alpha: 16, targets: [q, v]}
train: {epochs: 1, batch_size: 32, lr: 5.0e-4, eval_every: 100}
output_dir: runs/sst2-lora
```

Unknown keys are errors that list the valid ones; values are coerced to the field's type, so
``lr: 5e-4`` (a string to YAML) and ``--set train.lr=1e-3`` both work.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field, fields
from importlib import resources
from pathlib import Path
from typing import Any, Iterable

import yaml

from deltatune.errors import ConfigError
from deltatune.core.precision import PRECISIONS

TASKS = ("seq-cls", "token-cls", "causal-lm", "seq2seq", "text-to-image")
SCHEDULES = ("linear", "cosine", "constant")
OPTIMIZERS = ("adamw", "adamw8bit")


@dataclass
class DataSpec:
    """Where the examples are and which fields hold what.

    Attributes:
        train: training file (.tsv .csv .jsonl .json .txt) or a ``datasets`` object.
        eval: evaluation file or object; ``None`` with ``eval_fraction`` carves it from train.
        text: field with the input text (seq-cls, seq2seq source, plain-text LM), or the word
            list (token-cls).
        text_pair: optional second text field (sentence-pair classification).
        label: field with the class label (seq-cls), tag list (token-cls) or target text (seq2seq).
        format: causal-lm only: ``text`` (packed blocks), ``instruction`` ({instruction, input,
            output} records, loss on the response only) or ``auto`` (instruction when the
            records have those fields).
        max_length: longest tokenized example; longer ones are truncated (and counted).
        block_size: causal-lm ``text`` format: tokens per packed block.
        eval_fraction: share of the training examples kept apart for evaluation when ``eval``
            is not given (the last ones, so the split is fixed).
        max_train: use only the first ``max_train`` training rows (quick runs).
        max_eval: use only the first ``max_eval`` evaluation rows.
    """

    train: Any = None
    eval: Any = None
    text: str = "text"
    text_pair: str | None = None
    label: str = "label"
    format: str = "auto"
    max_length: int = 128
    block_size: int = 128
    eval_fraction: float | None = None
    max_train: int | None = None
    max_eval: int | None = None


@dataclass
class TrainSpec:
    """How to train.

    ``threads`` sets torch's CPU threads (default: torch's choice; 1 helps on a busy machine).
    ``distributed`` says how several processes (torchrun, accelerate launch) share the work:
    ``ddp`` (each holds the whole model) or ``fsdp`` (each holds a shard of every block; see
    docs/distributed.md); ``fsdp_offload`` keeps the shards in CPU memory between uses.
    ``compile`` runs the training forward and backward through ``torch.compile`` (off by
    default: see docs/benchmarks.md for where it helps).
    ``batch_size`` is per process and micro-batch: one optimizer step sees
    ``batch_size * grad_accum * world_size`` examples. ``epochs`` and ``max_steps`` both bound
    the run; whichever is reached first ends it. ``warmup`` below 1 is a fraction of the
    steps, from 1 up a number of steps. ``lora_plus_ratio`` (LoRA+) multiplies the LR of
    LoRA's B matrices (16 is the paper's usual value).
    ``eval_on_start`` also evaluates the untrained start, step 0 of the curves (off by default,
    as in transformers' ``TrainingArguments``: it costs one more pass over the eval data).
    ``padding_free`` (on by default) runs the transformer blocks on a batch's real tokens only,
    each sequence attending to itself (:mod:`~deltatune.train.packing`): the update of the padded
    batch without computing its padding. It is checked on the first batch against the padded
    outputs; a model that differs, or a compiled or FSDP run, trains padded instead.
    ``split_by_length`` (on by default, single process, used where padding-free is not) runs
    each batch as pieces of similar length, so that short examples are not padded to the longest
    one: the same update as the whole batch, with far less padding computed
    (:func:`~deltatune.train.batching.length_pieces`).
    ``group_by_length`` instead puts examples of similar length into the same batch (less
    padding still, but batches are no longer random samples: on SST-2 it cost 0.7 points of dev
    accuracy, see docs/benchmarks.md).
    """

    epochs: int = 1
    max_steps: int | None = None
    batch_size: int = 32
    eval_batch_size: int | None = None
    lr: float = 5.0e-4
    schedule: str = "linear"
    warmup: float = 0.0
    weight_decay: float = 0.0
    optimizer: str = "adamw"
    precision: str = "auto"
    grad_accum: int = 1
    max_grad_norm: float | None = 1.0
    gradient_checkpointing: bool = False
    compile: bool = False
    layer_decay: float | None = None
    lora_plus_ratio: float | None = None
    seed: int = 0
    eval_every: int | None = None
    log_every: int = 10
    best_metric: str | None = None
    patience: int | None = None
    restore_best: bool = True
    eval_on_start: bool = False
    checkpoint_every: int | None = None
    keep_checkpoints: int = 1
    group_by_length: bool = False
    padding_free: bool = True
    split_by_length: bool = True
    tensorboard: bool = False
    device: str = "auto"
    threads: int | None = None
    distributed: str = "ddp"
    fsdp_offload: bool = False


@dataclass
class Recipe:
    """A whole training run. ``method`` is the method config's fields plus ``type``;
    ``quantize`` (optional) holds :func:`deltatune.quantize` arguments for QLoRA."""

    model: str = "minilm"
    task: str = "seq-cls"
    data: DataSpec = field(default_factory=DataSpec)
    method: dict = field(default_factory=lambda: {"type": "lora"})
    train: TrainSpec = field(default_factory=TrainSpec)
    output_dir: str = "runs/run"
    quantize: dict | None = None
    #: the folder relative data paths are resolved against (the current folder at load time)
    base_dir: str = field(default=".", metadata={"internal": True})

    def validate(self) -> "Recipe":
        """Check values that have a fixed set of choices or a range; returns self."""
        _choice("task", self.task, TASKS)
        _choice("train.schedule", self.train.schedule, SCHEDULES)
        _choice("train.precision", self.train.precision, PRECISIONS)
        _choice("train.optimizer", self.train.optimizer, OPTIMIZERS)
        _choice("data.format", self.data.format, ("auto", "text", "instruction"))
        _choice("train.distributed", self.train.distributed, ("ddp", "fsdp"))
        t = self.train
        for name in ("epochs", "batch_size", "grad_accum", "log_every", "keep_checkpoints"):
            if getattr(t, name) < 1:
                raise ConfigError(f"train.{name} must be at least 1, got {getattr(t, name)}")
        for name in ("max_steps", "eval_every", "eval_batch_size", "patience", "threads", "checkpoint_every"):
            value = getattr(t, name)
            if value is not None and value < 1:
                raise ConfigError(f"train.{name} must be at least 1 (or left out), got {value}")
        if t.lr <= 0 or t.warmup < 0 or t.weight_decay < 0:
            raise ConfigError("train.lr must be positive and train.warmup / train.weight_decay not negative")
        if t.layer_decay is not None and not 0 < t.layer_decay <= 1:
            raise ConfigError(f"train.layer_decay must be in (0, 1], got {t.layer_decay}")
        if t.lora_plus_ratio is not None and t.lora_plus_ratio <= 0:
            raise ConfigError(f"train.lora_plus_ratio must be positive, got {t.lora_plus_ratio}")
        if t.patience is not None and t.eval_every is None and self.data.eval is None and not self.data.eval_fraction:
            raise ConfigError("train.patience (early stopping) needs evaluation data: set data.eval or data.eval_fraction")
        if self.data.train is None:
            raise ConfigError("the recipe names no training data: set data.train to a file")
        if not isinstance(self.method, dict) or "type" not in self.method:
            raise ConfigError("method must be a mapping with a 'type', e.g. {type: lora, r: 8}")
        if self.data.eval_fraction is not None and not 0 < self.data.eval_fraction < 1:
            raise ConfigError(f"data.eval_fraction must be in (0, 1), got {self.data.eval_fraction}")
        return self

    def resolve_path(self, value: Any) -> Any:
        """A data path relative to the recipe's folder (non-paths pass through)."""
        if isinstance(value, (str, os.PathLike)):
            path = Path(value).expanduser()
            return os.path.abspath(path if path.is_absolute() else Path(self.base_dir) / path)
        return value

    def to_dict(self) -> dict:
        """The recipe as plain YAML-able data (``base_dir`` left out; data paths resolved)."""
        out = _to_plain(self)
        out.pop("base_dir", None)
        for key in ("train", "eval"):
            value = getattr(self.data, key)
            out["data"][key] = self.resolve_path(value) if isinstance(value, (str, os.PathLike)) else (
                None if value is None else f"<{type(value).__name__}>")
        return out

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def _choice(name: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(choices)}; got {value!r}")


def _to_plain(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {f.name: _to_plain(getattr(obj, f.name)) for f in fields(obj)}
    if isinstance(obj, dict):
        return {k: _to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_to_plain(v) for v in obj]
    return obj


# --- keys ----------------------------------------------------------------------------------

def _field_names(cls: type) -> list[str]:
    """The keys of the recipe (or of one of its sections), in field order."""
    return [f.name for f in fields(cls) if not f.metadata.get("internal")]


#: the top-level recipe keys
KEYS = tuple(_field_names(Recipe))
#: the sections with fixed keys; ``method`` and ``quantize`` take options that the method (or
#: the quantization) checks when it reads them
_SECTIONS = {"data": DataSpec, "train": TrainSpec}
_OPEN_SECTIONS = ("method", "quantize")


def check_key(key: str) -> None:
    """Raise :class:`ConfigError` unless the dotted ``key`` names a recipe value: a top-level
    key or section, a ``data`` / ``train`` field, or an option under ``method`` / ``quantize``.
    An unknown key gets the message :func:`from_dict` gives for it, with the valid keys."""
    head, *rest = key.split(".")
    _reject_unknown([head], KEYS, "recipe")
    if not rest or head in _OPEN_SECTIONS:
        return
    if head in _SECTIONS:
        _reject_unknown(rest[:1], _field_names(_SECTIONS[head]), head)
        head, rest = f"{head}.{rest[0]}", rest[1:]
    if rest:
        raise ConfigError(f"{head} is a value, not a section, so {key} is not a recipe key")


def _reject_unknown(keys: Iterable[str], valid: list[str] | tuple[str, ...], where: str) -> None:
    """Raise :class:`ConfigError` naming the ``keys`` not among ``valid`` (of the recipe, or
    of the section ``where``) and the valid ones."""
    unknown = sorted(set(map(str, keys)) - set(valid))  # YAML keys may be numbers: compare as text
    if unknown:
        plural, listed = ("s" if len(unknown) > 1 else ""), ", ".join(unknown)
        what = f"recipe key{plural} {listed}" if where == "recipe" else f"key{plural} {listed} in {where}"
        raise ConfigError(f"unknown {what}; valid keys: {', '.join(valid)}")


# --- building from data ---------------------------------------------------------------------

def coerce(value: Any, annotation: Any, where: str) -> Any:
    """``value`` as the type ``annotation`` names (str/int/float/bool, optionally None)."""
    hint = annotation if not isinstance(annotation, str) else eval(annotation, {"Any": Any})  # noqa: S307
    if hint is Any:
        return value
    args = typing.get_args(hint) if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union else (hint,)
    if value is None:
        if type(None) in args:
            return None
        raise ConfigError(f"{where} cannot be empty")
    for kind in (bool, int, float, str, dict):
        if kind not in args:
            continue
        if kind is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
                return value.lower() in ("true", "yes", "1")
            continue
        if kind is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if kind is int and isinstance(value, float) and value.is_integer() and float not in args:
            return int(value)
        if kind is int and isinstance(value, str) and float not in args:
            try:
                return int(value)
            except ValueError:
                continue
        if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if kind is float and isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                continue
        if kind is str and isinstance(value, (str, os.PathLike)):
            return str(value)
        if kind is dict and isinstance(value, dict):
            return value
    expected = " or ".join(getattr(a, "__name__", str(a)) for a in args)
    raise ConfigError(f"{where} should be {expected}, got {value!r}")


def _section(cls: type, data: Any, where: str):
    if isinstance(data, cls):
        return data
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must be a mapping of keys to values, got {data!r}")
    _reject_unknown(data, _field_names(cls), where)
    hints = typing.get_type_hints(cls)
    return cls(**{k: coerce(v, hints[k], f"{where}.{k}" if where != "recipe" else k) for k, v in data.items()})


def method_section(value: Any) -> Any:
    """A recipe's ``method`` value with the short form ``method: lora`` written as the section
    ``{type: lora}`` (anything else as it is, for the checks to judge)."""
    return {"type": value} if isinstance(value, str) else value


def from_dict(data: dict, base_dir: str | os.PathLike = ".") -> Recipe:
    """A validated :class:`Recipe` from plain data (e.g. parsed YAML)."""
    if not isinstance(data, dict):
        raise ConfigError(f"a recipe is a mapping (model:, task:, data:, ...), got {type(data).__name__}")
    data = dict(data)
    _reject_unknown(data, KEYS, "recipe")
    kwargs: dict[str, Any] = {"base_dir": str(base_dir)}
    for key in ("model", "task", "output_dir"):
        if key in data:
            kwargs[key] = coerce(data[key], str, key)
    if "data" in data:
        kwargs["data"] = _section(DataSpec, data["data"], "data")
    if "train" in data:
        kwargs["train"] = _section(TrainSpec, data["train"] or {}, "train")
    if "method" in data:
        method = method_section(data["method"])
        kwargs["method"] = dict(method) if isinstance(method, dict) else method
    if data.get("quantize") is not None:
        if not isinstance(data["quantize"], dict):
            raise ConfigError("quantize must be a mapping, e.g. {bits: 4, quant_type: nf4}")
        kwargs["quantize"] = dict(data["quantize"])
    return Recipe(**kwargs).validate()


def parse_value(text: str) -> Any:
    """A ``--set`` value: YAML scalars and lists (``[q, v]``), so ``8`` is an int and ``true`` a bool."""
    try:
        return yaml.safe_load(text) if text != "" else ""
    except yaml.YAMLError:
        return text


def apply_overrides(data: dict, overrides: Iterable[str]) -> dict:
    """Apply ``key.sub=value`` assignments (``--set``) to recipe data (a deep copy is returned)."""
    return set_keys(data, (_override(item) for item in overrides), "--set")


def _override(item: str) -> tuple[str, Any]:
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set expects key.sub=value, got {item!r}")
    return key.strip(), parse_value(raw)


def set_keys(data: dict, values: Iterable[tuple[str, Any]], source: str = "recipe key") -> dict:
    """A deep copy of recipe ``data`` with each ``(dotted key, value)`` of ``values`` assigned in
    order (missing sections are created; values keep their type). ``source`` says where the keys
    come from in errors (``--set``)."""
    data = copy.deepcopy(data)
    for key, value in values:
        *sections, leaf = key.split(".")
        node = data
        for part in sections:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if node is data and part == "method":
                child = node[part] = method_section(child)
            if not isinstance(child, dict):
                raise ConfigError(f"{source} {key}: {part} is not a section")
            node = child
        node[leaf] = copy.deepcopy(value)
    return data


def builtin_names() -> list[str]:
    """Names of the recipes that ship with deltatune (``sst2-lora`` ...)."""
    folder = resources.files("deltatune.train") / "recipes"
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml"))


def builtin_path(name: str) -> Path:
    return Path(str(resources.files("deltatune.train") / "recipes" / f"{name}.yaml"))


def read_data(source: str | os.PathLike) -> dict:
    """The parsed YAML of a recipe file or a built-in recipe name."""
    path = Path(source)
    if not path.is_file():
        if str(source) not in builtin_names():
            raise ConfigError(f"recipe {str(source)!r} is neither a file nor a built-in recipe "
                              f"({', '.join(builtin_names())})")
        path = builtin_path(str(source))
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from None
    return data or {}


def load(source: str | os.PathLike | dict, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """A validated recipe from a file, a built-in name or a dict, with ``--set`` overrides.

    Relative paths (data files, output_dir) are relative to the current folder, as on the
    command line.
    """
    data = source if isinstance(source, dict) else read_data(source)
    return from_dict(apply_overrides(data, overrides), Path.cwd())
