"""``deltatune eval``: the metrics of an adapter (or a plain model folder) on a data file."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from deltatune.core import precision as precision_mod
from deltatune.core.loading import load_model, load_tokenizer
from deltatune.errors import ConfigError
from deltatune.train.adapter_info import base_for, load_adapted, run_labels, run_recipe
from deltatune.train.data import read_rows
from deltatune.train.recipe import DataSpec
from deltatune.train.tasks import TASKS


def _data_spec(run: dict | None, text: str | None, label: str | None, max_length: int | None) -> DataSpec:
    base = (run or {}).get("data") or {}
    spec = DataSpec(**{k: base[k] for k in ("text", "text_pair", "label", "format", "max_length", "block_size")
                       if base.get(k) is not None})
    spec.text, spec.label = text or spec.text, label or spec.label
    spec.max_length = max_length or spec.max_length
    return spec


def evaluate(data: str | os.PathLike, adapter: str | os.PathLike | None = None, model: str | None = None,
             task: str | None = None, text: str | None = None, label: str | None = None,
             batch_size: int = 64, max_length: int | None = None) -> dict:
    """Metrics (accuracy/F1/loss, or loss/perplexity) of ``adapter`` on its base model, or of the
    plain ``model`` folder when no adapter is given, on the examples in ``data``."""
    if adapter is None and model is None:
        raise ConfigError("name what to evaluate: --adapter DIR (and optionally --model), or --model DIR")
    run = run_recipe(adapter) if adapter is not None else None
    if adapter is not None:
        model_name, task_name = base_for(adapter, model, task)
        net, tokenizer, _ = load_adapted(adapter, model_name, task_name)
    else:
        task_name = task or "seq-cls"
        if task_name not in TASKS:
            raise ConfigError(f"unknown task {task_name!r}; tasks: {', '.join(TASKS)}")
        model_name = model
        net, tokenizer = load_model(model_name, TASKS[task_name].auto_class, quiet=True), load_tokenizer(model_name)
    job = TASKS[task_name](_data_spec(run, text, label, max_length), tokenizer)
    config_labels = getattr(net.config, "id2label", None)
    labels = run_labels(adapter) if adapter is not None else None
    if labels is None and config_labels and adapter is None:
        labels = [str(config_labels[i]) for i in sorted(config_labels)]
    if labels is None and getattr(net.config, "num_labels", None):
        labels = [str(i) for i in range(net.config.num_labels)]
    job.labels = labels
    encoded = job.encode(read_rows(data), str(data))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    net.to(device)
    used = precision_mod.resolve("auto", device)
    metrics = job.evaluate(net, encoded, batch_size, device, precision_mod.autocast(used, device))
    return {"model": model_name, "adapter": str(adapter) if adapter else None, "task": task_name,
            "data": str(data), "examples": len(encoded), **metrics}
