"""What a saved adapter folder is (``deltatune inspect``), which base model and task it belongs
to, and loading it onto that model."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, fields
from pathlib import Path

from deltatune.api import load
from deltatune.core import registry
from deltatune.core.loading import load_model, load_tokenizer
from deltatune.core.state import CONFIG_NAME, WEIGHTS_NAME, read_config, saved_class_count, tensor_shapes
from deltatune.errors import AdapterFileError, ConfigError
from deltatune.train.tasks import PEFT_TASKS, TASKS


@dataclass
class AdapterInfo:
    """The facts ``deltatune inspect`` prints."""

    path: str
    method: str
    base_model: str | None
    task: str | None
    config: dict
    parameters: int
    tensors: int
    bytes: int
    run: dict | None  #: the recipe of the run that trained it, when it sits in a run folder

    def lines(self) -> list[str]:
        c = self.config
        out = [f"adapter      {self.path}", f"method       {self.method}",
               f"base model   {self.base_model or '(not recorded)'}", f"task         {self.task or '(not recorded)'}"]
        if c.get("targets") is not None:
            targets = c["targets"] if isinstance(c["targets"], str) else ", ".join(map(str, c["targets"]))
            out.append(f"targets      {targets}")
        if c.get("modules_to_save"):
            out.append(f"also saves   {', '.join(c['modules_to_save'])}")
        skip = {"targets", "modules_to_save", "task_type", "base_model"}
        options = {k: v for k, v in c.items() if k not in skip and v not in (None, {}, [], ())}
        if options:
            out.append("options      " + ", ".join(f"{k}={v}" for k, v in options.items()))
        out.append(f"parameters   {self.parameters:,} in {self.tensors} tensors ({self.bytes / 2**20:.2f} MiB on disk)")
        if self.run:
            out.append(f"trained by   {self.run.get('_path')} (model {self.run.get('model')}, task {self.run.get('task')})")
        return out


def run_recipe(adapter: str | os.PathLike) -> dict | None:
    """The resolved recipe of the run whose output folder holds ``adapter``, if any."""
    path = Path(adapter).resolve().parent / "recipe.yaml"
    if not path.is_file():
        return None
    import yaml
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError:
        return None
    return {**data, "_path": str(path)} if isinstance(data, dict) else None


def run_labels(adapter: str | os.PathLike) -> list[str] | None:
    """The class names of the run whose output folder holds ``adapter`` (its summary.json)."""
    summary = Path(adapter).resolve().parent / "summary.json"
    if not summary.is_file():
        return None
    try:
        labels = json.loads(summary.read_text()).get("labels")
    except (json.JSONDecodeError, AttributeError):
        return None
    return [str(v) for v in labels] if isinstance(labels, list) else None


def inspect_adapter(adapter: str | os.PathLike) -> AdapterInfo:
    """Read an adapter folder's config and tensor shapes (weights are not loaded)."""
    folder = Path(adapter)
    config_path, weights = folder / CONFIG_NAME, folder / WEIGHTS_NAME
    if not config_path.is_file():
        hint = ""
        if (folder / "config.json").is_file():
            hint = " It is a full model folder (config.json): load it with transformers' from_pretrained."
        raise AdapterFileError(f"{folder} is not an adapter folder: it has no {CONFIG_NAME}.{hint}")
    data = read_config(config_path)
    spec = registry.for_file(data)
    config = spec.config_cls.from_dict(data)
    values = {f.name: getattr(config, f.name) for f in fields(config)}
    count = n = 0
    if weights.is_file():
        for shape in tensor_shapes(weights).values():
            count, n = count + math.prod(shape), n + 1
    task = PEFT_TASKS.get(config.task_type) if config.task_type else None
    return AdapterInfo(str(folder), spec.name, config.base_model, task, values, count, n,
                       weights.stat().st_size if weights.is_file() else 0, run_recipe(folder))


def base_for(adapter: str | os.PathLike, model: str | None = None, task: str | None = None) -> tuple[str, str]:
    """``(model, task)`` for an adapter: the arguments, else its run's recipe, else its config."""
    info = inspect_adapter(adapter)
    run = info.run or {}
    model = model or run.get("model") or info.base_model
    task = task or run.get("task") or info.task
    if not model:
        raise ConfigError(f"{adapter} does not record its base model; pass --model ALIAS_OR_DIR")
    if task not in TASKS:
        raise ConfigError(f"{adapter} does not record a task deltatune trains; pass --task ({', '.join(TASKS)})")
    return model, task


def load_adapted(adapter: str | os.PathLike, model: str | None = None, task: str | None = None):
    """``(adapted model, tokenizer, task name)``: the adapter loaded onto its base model."""
    model, task = base_for(adapter, model, task)
    kwargs = {}
    count, names = saved_class_count(adapter), run_labels(adapter)
    if count:
        kwargs["num_labels"] = count
        if names and len(names) == count:  # kept through merge_and_unload into config.json
            kwargs.update(id2label=dict(enumerate(names)), label2id={n: i for i, n in enumerate(names)})
    base = load_model(model, TASKS[task].auto_class, quiet=True, **kwargs)
    return load(base, str(adapter)), load_tokenizer(model), task
