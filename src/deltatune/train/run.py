"""``deltatune train``: a recipe in, a trained adapter plus metrics, summary and plot out."""

from __future__ import annotations

import hashlib
import json
import resource
import shutil
import sys
import time
import warnings
from pathlib import Path
from typing import Any, TextIO

import torch

from deltatune.core import precision as precision_mod
from deltatune.core.loading import load_model, load_tokenizer
from deltatune.errors import ConfigError
from deltatune.quant import prepare_for_kbit_training, quantize
from deltatune.train import checkpoint, distributed, fsdp, tasks
from deltatune.train.callbacks import MetricsLog, Progress, TensorBoard, plot_losses, read_records
from deltatune.train.data import read_rows
from deltatune.train.files import write_json, write_text
from deltatune.train.interrupt import deferred_interrupt
from deltatune.train.loop import Trainer
from deltatune.train.methods import TrainMethod, resolve as resolve_method
from deltatune.train.recipe import Recipe, load as load_recipe

#: recipe keys that may change between a run and its resumption
RESUMABLE_CHANGES = {("train", k) for k in ("max_steps", "epochs", "eval_every", "log_every", "patience",
                                             "checkpoint_every", "keep_checkpoints", "tensorboard", "device",
                                             "threads", "batch_size", "distributed", "fsdp_offload")}
#: files and folders a run writes (``--overwrite`` removes them first)
RUN_FILES = ("checkpoints", "metrics.jsonl", "summary.json", "loss.png", "recipe.yaml", "tensorboard",
             "adapter", "model", "head")
#: what marks a folder as holding a run worth keeping (a run that died before its first
#: checkpoint left nothing to resume, and is simply started again)
_KEEP = ("checkpoints", "summary.json", "adapter", "model", "head")


def fingerprint(recipe: Recipe) -> str:
    """A hash of everything that decides the training trajectory (so a resumed run is the same run)."""
    data = recipe.to_dict()
    for section, key in RESUMABLE_CHANGES:
        data[section].pop(key, None)
    data.pop("output_dir", None)
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def resume_changes(saved_recipe: Path, recipe: Recipe) -> list[str]:
    """``"train.max_steps 100 -> 50"`` for each resumable key the run's saved recipe had otherwise."""
    import yaml
    try:
        saved = yaml.safe_load(saved_recipe.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return []
    now = recipe.to_dict()
    if not isinstance(saved, dict):
        return []
    before = {(s, k): (saved.get(s) or {}).get(k) for s, k in RESUMABLE_CHANGES}
    return [f"{s}.{k} {before[s, k]!r} -> {now[s].get(k)!r}" for s, k in sorted(RESUMABLE_CHANGES)
            if before[s, k] != now[s].get(k)]


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's generators (torch.manual_seed covers every device), as
    transformers.set_seed does. Not that function itself: importing it loads transformers' Trainer
    utilities, which import peft and bitsandbytes, several seconds of every run's start-up."""
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def peak_memory_mb() -> float:
    """This process's peak resident memory so far, in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def train(recipe: Recipe | str | dict, overrides: list[str] | tuple[str, ...] = (), *, resume: bool = False,
          overwrite: bool = False, stream: TextIO | None = None, quiet: bool = False) -> dict:
    """Run a recipe (a :class:`Recipe`, a YAML path, a built-in name or a dict) and return the
    summary that also goes to ``output_dir/summary.json``.

    Under ``torchrun`` every process calls this; rank 0 writes the files.
    """
    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe, overrides)
    if recipe.task == "text-to-image":  # a diffusers pipeline, with its own loop
        from deltatune.train.text_to_image import train_text_to_image
        return train_text_to_image(recipe, resume=resume, overwrite=overwrite, stream=stream, quiet=quiet)
    dist = distributed.setup(recipe.train.device)
    if recipe.train.threads:
        torch.set_num_threads(recipe.train.threads)
    try:
        return _train(recipe, dist, resume, overwrite, stream or sys.stderr, quiet)
    finally:
        distributed.teardown()


def _prepare_output(out: Path, resume: bool, overwrite: bool, dist) -> None:
    previous = [name for name in RUN_FILES if (out / name).exists()]
    kept = [name for name in _KEEP if name in previous]
    if kept and not resume and not overwrite:
        raise ConfigError(f"{out} holds a previous run ({', '.join(kept)}); pass --resume to continue it "
                          f"or --overwrite to start again")
    if dist.main:
        if overwrite:
            for name in previous:
                path = out / name
                shutil.rmtree(path) if path.is_dir() else path.unlink()
        out.mkdir(parents=True, exist_ok=True)
    dist.barrier()


def load_data(recipe: Recipe, task: tasks.Task) -> tuple[tasks.Encoded, tasks.Encoded | None, list[str]]:
    """Read and encode the training and evaluation examples; returns notes on truncation."""
    spec = recipe.data
    train_rows = read_rows(recipe.resolve_path(spec.train), spec.max_train)
    task.fit_labels(train_rows)
    train_set = task.encode(train_rows, "train")
    eval_set = None
    if spec.eval is not None:
        eval_set = task.encode(read_rows(recipe.resolve_path(spec.eval), spec.max_eval), "eval")
    elif spec.eval_fraction:
        train_set, eval_set = train_set.split_off(spec.eval_fraction)
        if spec.max_eval is not None:
            eval_set = tasks.Encoded(eval_set.features[:spec.max_eval])
    if len(train_set) == 0:
        raise ConfigError("the training data holds no usable examples")
    notes = [n for n in (tasks.warn_truncation(train_set, "train", spec.max_length),
                         tasks.warn_truncation(eval_set, "eval", spec.max_length) if eval_set else None) if n]
    return train_set, eval_set, notes


def _quantize(model, options: dict, gradient_checkpointing: bool):
    options = dict(options)
    if isinstance(options.get("compute_dtype"), str):
        names = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
        if options["compute_dtype"] not in names:
            raise ConfigError(f"quantize.compute_dtype must be one of {', '.join(names)}")
        options["compute_dtype"] = names[options["compute_dtype"]]
    try:
        model = quantize(model, **options)
    except TypeError as exc:
        raise ConfigError(f"quantize: {exc}") from None
    return prepare_for_kbit_training(model, gradient_checkpointing=gradient_checkpointing)


def build_model(recipe: Recipe, task: tasks.Task, method: TrainMethod, device: torch.device):
    """The base model for ``task``, on ``device``, made trainable by ``method``."""
    kwargs = task.model_kwargs()
    model = load_model(recipe.model, task.auto_class, quiet=True, **kwargs)
    if getattr(model.config, "pad_token_id", None) is None and task.tokenizer.pad_token_id is not None:
        model.config.pad_token_id = task.tokenizer.pad_token_id
    model.to(device)
    if recipe.quantize:
        model = _quantize(model, recipe.quantize, recipe.train.gradient_checkpointing)
    elif recipe.train.gradient_checkpointing:
        if not getattr(model, "supports_gradient_checkpointing", False):
            raise ConfigError(f"{type(model).__name__} does not support gradient checkpointing")
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return method.apply(model)


def parameter_counts(model) -> tuple[int, int]:
    """``(trainable, total)`` parameters as a run reports them (a model may say itself)."""
    if hasattr(model, "parameter_counts"):
        return model.parameter_counts()
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def _train(recipe: Recipe, dist, resume: bool, overwrite: bool, stream: TextIO, quiet: bool) -> dict:
    began = time.perf_counter()
    spec, out = recipe.train, Path(recipe.output_dir)
    tasks.get(recipe.task).selection_metric(spec.best_metric)  # a bad name fails before anything loads
    _prepare_output(out, resume, overwrite, dist)
    say = (lambda line: print(line, file=stream, flush=True)) if dist.main and not quiet else (lambda line: None)
    with warnings.catch_warnings():
        if not dist.main:
            warnings.simplefilter("ignore")
        seed_everything(spec.seed)
        method = resolve_method(recipe.method)
        task = tasks.get(recipe.task)(recipe.data, load_tokenizer(recipe.model))
        train_set, eval_set, notes = load_data(recipe, task)
        # sharding moves each block to the device by itself: the whole model never lands there
        sharded = dist.active and fsdp.strategy(spec.distributed) == "fsdp" and not recipe.quantize
        model = build_model(recipe, task, method, torch.device("cpu") if sharded else dist.device)
    used = precision_mod.resolve(spec.precision, dist.device)
    trainable, total = parameter_counts(model)
    say(f"deltatune: {recipe.task} on {recipe.model} with {method.name}: {trainable:,} trainable of {total:,} "
        f"parameters; {len(train_set):,} train / {len(eval_set) if eval_set else 0:,} eval examples; "
        f"{used} on {dist.device}" + (f" x {dist.world_size} processes" if dist.active else ""))
    for note in notes:
        say(f"note: {note}")

    print_ = fingerprint(recipe)
    ckpt = checkpoint.latest(out / "checkpoints") if resume else None
    if ckpt is not None:
        saved = json.loads((ckpt / "state.json").read_text()).get("fingerprint")
        if saved != print_:
            raise ConfigError(f"{ckpt} belongs to a run with a different recipe (model, data, method or training "
                              f"settings changed, or a deltatune version with other defaults, such as "
                              f"train.group_by_length, made it); resume with the same recipe and version, "
                              f"or use --overwrite")
        say(f"resuming from {ckpt}")
        changed = resume_changes(out / "recipe.yaml", recipe)
        if changed and dist.main:
            steps = any(c.startswith(("train.max_steps ", "train.epochs ")) for c in changed)
            warnings.warn(f"resuming with changed settings: {'; '.join(changed)}" + (
                "; the learning-rate schedule now follows the new step count, so the run differs from an "
                "uninterrupted one" if steps else ""), stacklevel=2)
    elif resume:
        say(f"no checkpoint in {out / 'checkpoints'}; starting from the beginning")
    log = MetricsLog(out / "metrics.jsonl", enabled=dist.main)
    if dist.main:
        write_text(out / "recipe.yaml", recipe.to_yaml())
        if ckpt is not None:
            log.rewind(json.loads((ckpt / "state.json").read_text())["step"])
        else:
            (out / "metrics.jsonl").unlink(missing_ok=True)
    extra = ()
    if spec.tensorboard and dist.main:
        extra = (TensorBoard(out / "tensorboard"),)
    trainer = Trainer(model, task, train_set, eval_set, spec, dist, out, precision_mod.autocast(used, dist.device),
                      log, extra, print_)
    progress = Progress(trainer.total_steps, 0, spec.log_every, stream, enabled=dist.main and not quiet)
    try:
        with deferred_interrupt(enabled=not dist.active) as asked:
            trainer.stop_requested = asked
            outcome = trainer.fit(ckpt, progress)
    finally:
        progress.close()
        log.close()
        for writer in extra:
            writer.close()

    result = out / method.result
    summary: dict[str, Any] = {
        "model": recipe.model, "task": recipe.task, "method": method.name, "metrics": outcome.metrics,
        "best": outcome.best, "stopped_early": outcome.stopped_early, "steps": outcome.steps,
        "epochs": outcome.epochs, "train_loss": outcome.train_loss, "train_examples": len(train_set),
        "eval_examples": len(eval_set) if eval_set else 0, "trainable_params": trainable, "total_params": total,
        "trainable_percent": round(100 * trainable / max(total, 1), 4),
        "train_time_s": round(outcome.elapsed, 2), "wall_time_s": round(time.perf_counter() - began, 2),
        "tokens_per_s": round(outcome.tokens / max(outcome.elapsed, 1e-9), 1),
        "peak_memory_mb": round(peak_memory_mb(), 1), "precision": used, "device": str(dist.device),
        "world_size": dist.world_size, "cpu": precision_mod.cpu_capability(), "notes": notes,
        "labels": task.labels,
        "result": str(result), "resumed": ckpt is not None, **method.summary_facts(model),
    }
    if dist.device.type == "cuda":
        summary["cuda_peak_memory_mb"] = round(torch.cuda.max_memory_allocated(dist.device) / 2**20, 1)
    summary["distributed"] = ("fsdp" if trainer.sharded else "ddp") if dist.active else None
    summary["padding_free"] = trainer.packer is not None and trainer.packer_checked
    summary["parameter_bytes_per_process"] = [int(t) for t in dist.gather_tensor(
        torch.tensor([fsdp.local_parameter_bytes(model)], dtype=torch.float64))]
    with fsdp.full_trainables(model):  # under FSDP: the whole adapter, gathered from every process
        if dist.main:
            method.save(model, result)
    if dist.main:
        if plot_losses(read_records(out / "metrics.jsonl"), out / "loss.png",
                       f"{recipe.model} {method.name} {recipe.task}"):
            summary["plot"] = str(out / "loss.png")
        write_json(out / "summary.json", summary)
        shown = ", ".join(f"{k} {v:.4f}" for k, v in outcome.metrics.items())
        say(f"done in {summary['wall_time_s']:.0f}s: {shown or 'no eval data'}; {method.result} -> {result}")
    dist.barrier()
    return summary
