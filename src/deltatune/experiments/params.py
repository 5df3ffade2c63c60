"""``deltatune analyze params``: what a recipe's method costs, without training.

The model is built exactly as ``deltatune train`` builds it (same task head, same method), then:

- trainable and total parameters (as the training summary counts them) and the percentage;
- the adapter file size: the bytes of the ``.safetensors`` files the method's save writes
  (saved for real into a temporary folder);
- estimated optimizer memory: AdamW keeps two fp32 moments per trainable parameter, 8 bytes
  each; gradients add 4 bytes per trainable parameter in fp32.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

#: bytes of AdamW state per trainable parameter (exp_avg and exp_avg_sq, fp32)
ADAMW_BYTES_PER_PARAM = 2 * 4
#: bytes of an fp32 gradient per trainable parameter
GRAD_BYTES_PER_PARAM = 4


def file_bytes(method, model: torch.nn.Module) -> int:
    """Bytes of the ``.safetensors`` files ``method.save`` writes for ``model``."""
    with tempfile.TemporaryDirectory(prefix="deltatune-params-") as tmp:
        folder = Path(tmp) / method.result
        method.save(model, folder)
        return sum(p.stat().st_size for p in folder.rglob("*.safetensors"))


def model_params(model: torch.nn.Module, method) -> dict:
    """The parameter and memory table of an already built, method-applied ``model``."""
    from deltatune.train.run import parameter_counts

    trainable, total = parameter_counts(model)
    return {"method": method.name, "trainable_params": trainable, "total_params": total,
            "trainable_percent": 100.0 * trainable / max(total, 1),
            "file_bytes": file_bytes(method, model),
            "optimizer_bytes": ADAMW_BYTES_PER_PARAM * trainable,
            "gradient_bytes": GRAD_BYTES_PER_PARAM * trainable}


def recipe_params(source, overrides: list[str] | tuple[str, ...] = ()) -> dict:
    """:func:`model_params` for a recipe (file, built-in name or dict): the model, its task head
    (labels read from the training data) and its method, built on the CPU without training."""
    from deltatune.core.loading import load_tokenizer
    from deltatune.train import tasks
    from deltatune.train.data import read_rows
    from deltatune.train.methods import resolve
    from deltatune.train.recipe import load
    from deltatune.train.run import build_model

    recipe = load(source, overrides)
    method = resolve(recipe.method)
    task = tasks.get(recipe.task)(recipe.data, load_tokenizer(recipe.model))
    task.fit_labels(read_rows(recipe.resolve_path(recipe.data.train), recipe.data.max_train))
    model = build_model(recipe, task, method, torch.device("cpu"))
    return {"model": recipe.model, "task": recipe.task, "method_config": dict(recipe.method),
            **model_params(model, method)}


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def format_params(result: dict) -> str:
    """The table as aligned lines."""
    rows = [("model", str(result.get("model", ""))), ("method", result["method"]),
            ("trainable parameters", f"{result['trainable_params']:,}"),
            ("total parameters", f"{result['total_params']:,}"),
            ("trainable %", f"{result['trainable_percent']:.4f}%"),
            ("adapter file size", f"{_size(result['file_bytes'])} ({result['file_bytes']:,} bytes)"),
            ("AdamW state (2 x fp32)", f"{_size(result['optimizer_bytes'])} ({result['optimizer_bytes']:,} bytes)"),
            ("gradients (fp32)", f"{_size(result['gradient_bytes'])} ({result['gradient_bytes']:,} bytes)")]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
