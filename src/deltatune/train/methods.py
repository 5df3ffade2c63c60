"""What a recipe's ``method:`` section trains.

Any registered method (``{type: lora, r: 8, ...}``) is looked up in the registry and attached,
so new methods need no change here. Until the freeze methods exist (issue 5), two baselines
live here as a small "no adapter" mode: ``full`` (every parameter trains) and ``head-only``
(only the classification head trains). A registered method of the same name wins over them,
so they retire by themselves when ``FreezeConfig`` registers.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from safetensors.torch import save_file
from torch import nn

import deltatune as dt
from deltatune.core import registry
from deltatune.core.archspec import classification_head_names
from deltatune.errors import ConfigError
from deltatune.train.files import replace_dir, write_atomic


class TrainMethod:
    """How to make a base model trainable and where the result is saved."""

    name: str = ""
    #: the folder under output_dir that :meth:`save` writes
    result: str = "adapter"

    def apply(self, model: nn.Module) -> nn.Module:
        """The model to train (parameters to train have ``requires_grad``)."""
        raise NotImplementedError

    def save(self, model: nn.Module, folder: Path, tokenizer=None) -> None:
        """Write the trained result into ``folder``."""
        raise NotImplementedError

    def describe(self) -> dict:
        return {"type": self.name}


class AdapterMethod(TrainMethod):
    """A registered PEFT method, attached with :func:`deltatune.attach`; saved as a
    PEFT-compatible adapter folder."""

    result = "adapter"

    def __init__(self, config: dt.MethodConfig) -> None:
        self.config = config
        self.name = type(config).method

    def apply(self, model: nn.Module) -> nn.Module:
        return dt.attach(model, self.config)

    def save(self, model: nn.Module, folder: Path, tokenizer=None) -> None:
        replace_dir(folder, lambda tmp: model.save(str(tmp)))

    def describe(self) -> dict:
        return {"type": self.name, **{k: v for k, v in self.config.to_dict().items()}}


class FullFineTune(TrainMethod):
    """Baseline: every parameter trains; the model is saved with ``save_pretrained``."""

    name, result = "full", "model"

    def apply(self, model: nn.Module) -> nn.Module:
        for p in model.parameters():
            p.requires_grad_(True)
        return model

    def save(self, model: nn.Module, folder: Path, tokenizer=None) -> None:
        def fill(tmp: Path) -> None:
            model.save_pretrained(str(tmp))
            if tokenizer is not None:
                tokenizer.save_pretrained(str(tmp))
        replace_dir(folder, fill)


class HeadOnly(TrainMethod):
    """Baseline: only the classification head trains; its weights are saved as
    ``head.safetensors`` (keys as in the base model's state dict)."""

    name, result = "head-only", "head"

    def apply(self, model: nn.Module) -> nn.Module:
        heads = classification_head_names(model)
        if not heads:
            raise ConfigError(f"method head-only trains a classification head, and a {type(model).__name__} "
                              f"has none; use task seq-cls or token-cls")
        for p in model.parameters():
            p.requires_grad_(False)
        for name in heads:
            for p in getattr(model, name).parameters():
                p.requires_grad_(True)
        return model

    def save(self, model: nn.Module, folder: Path, tokenizer=None) -> None:
        tensors = {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}
        base = getattr(model.config, "_name_or_path", "")
        folder.mkdir(parents=True, exist_ok=True)
        write_atomic(folder / "head.safetensors",
                     lambda p: save_file(tensors, p, metadata={"format": "pt", "base_model": str(base)}))


BASELINES: dict[str, type[TrainMethod]] = {"full": FullFineTune, "head-only": HeadOnly}


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
        return AdapterMethod(spec.config_cls(**fields))
    if kind in BASELINES:
        if fields:
            raise ConfigError(f"method {kind} takes no options, got {', '.join(sorted(fields))}")
        return BASELINES[kind]()
    raise ConfigError(f"unknown method type {kind!r}; available: {', '.join(registry.names() + sorted(BASELINES))}")
