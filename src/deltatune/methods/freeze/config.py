"""Layer freezing and the full / head-only baselines, as adapter configs.

HF PEFT has no such methods, so files name the method with ``deltatune_method``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence

from deltatune.core.config import MethodConfig, is_int
from deltatune.errors import ConfigError

PART_WORDS = ("embeddings", "head", "all")
_END = re.compile(r"(upper|lower):(\d+)")


def parse_train(train) -> tuple[int | str, ...]:
    """``train`` as a tuple of items: block indices (ints), ``"upper:k"``, ``"lower:k"``,
    ``"embeddings"``, ``"head"``, ``"all"``. Accepts one item, a comma-separated string, or a list."""
    if is_int(train) or isinstance(train, str):
        items = [s.strip() for s in train.split(",")] if isinstance(train, str) else [train]
    elif isinstance(train, (list, tuple)):
        items = list(train)
    else:
        raise ConfigError(f"train must be a string such as 'upper:2,head' or a list of block indices and part "
                          f"names, got {train!r}")
    parsed: list[int | str] = []
    for item in items:
        if isinstance(item, str) and item.isdigit():
            item = int(item)
        if is_int(item):
            if item < 0:
                raise ConfigError(f"block indices in train must be >= 0, got {item}")
        elif isinstance(item, str) and (m := _END.fullmatch(item)):
            if int(m.group(2)) < 1:
                raise ConfigError(f"{item!r} selects no block; use {m.group(1)}:1 or more")
        elif item not in PART_WORDS:
            raise ConfigError(f"unknown part {item!r} in train; use block indices, 'upper:k', 'lower:k', "
                              f"{', '.join(repr(w) for w in PART_WORDS)}")
        if item not in parsed:
            parsed.append(item)
    if not parsed:
        raise ConfigError("train selects nothing; say which parts to train, e.g. train='upper:2'")
    return tuple(parsed)


@dataclass(frozen=True)
class FreezeConfig(MethodConfig):
    """Train chosen parts of the model in full and freeze the rest.

    Each chosen module gets a trainable copy per adapter (the core's ``ModulesToSave``): the base
    stays untouched, so ``disabled()`` gives the base model, ``remove`` restores it, the adapter
    file holds the trained copies, and ``merge_and_unload`` returns the model with them in place.
    Tied weights (GPT-2's output head and input embedding, T5's shared embedding) are trained as
    separate copies.

    Attributes:
        train: what to train, as one item, a comma-separated string or a list of items:
            ``"upper:k"`` / ``"lower:k"``: the top / bottom k transformer blocks (of each stack,
            for encoder-decoders); an integer: that block (of each stack); ``"embeddings"``: the
            input embeddings (BERT's whole ``embeddings`` module, else every embedding table
            outside the blocks); ``"head"``: the classification head, or the LM output head;
            ``"all"``: every top-level part of the model (full fine-tuning).
            E.g. ``"upper:2,head"``, ``[0, 5, "embeddings"]``.

    A sequence-classification head trains in any case, as with every method (``modules_to_save``).

    Example::

        dt.FreezeConfig(train="upper:2")
    """

    method = "freeze"

    train: str | int | Sequence[int | str] = "upper:2"

    def validate(self) -> None:
        super().validate()
        object.__setattr__(self, "train", parse_train(self.train))


@dataclass(frozen=True)
class _Preset(FreezeConfig):
    """A FreezeConfig with a fixed ``train``."""

    def validate(self) -> None:
        preset = type(self).__dataclass_fields__["train"].default
        super().validate()
        if self.train != parse_train(preset):
            raise ConfigError(f"{type(self).__name__} always trains {preset!r}; for other parts use "
                              f"FreezeConfig(train=...)")


@dataclass(frozen=True)
class HeadOnlyConfig(_Preset):
    """The head-only baseline: train only the classification head (or the LM output head)."""

    method = "head-only"

    train: str | int | Sequence[int | str] = "head"


@dataclass(frozen=True)
class FullConfig(_Preset):
    """The full fine-tuning baseline: every parameter of the model trains (as a copy of each
    top-level part, so the base model stays available through ``disabled()``)."""

    method = "full"

    train: str | int | Sequence[int | str] = "all"
