"""Resumable checkpoints: trainable weights, optimizer and schedule state, every process's RNG
state and the loop's position, written atomically (safetensors for tensors, JSON for the rest;
nothing is pickled).

``output_dir/checkpoints/step-000300/`` holds one; ``checkpoints/best/`` the best weights so far.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from deltatune.errors import DeltatuneError
from deltatune.train import fsdp
from deltatune.train.distributed import Dist
from deltatune.train.files import remove_leftovers, replace_dir

WEIGHTS = "trainable.safetensors"
PREFIX = "step-"


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The parameters with ``requires_grad``, by name."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def _save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, str(path))


def load_trainable(model: nn.Module, path: Path) -> None:
    """Copy saved trainable weights back into ``model`` (names and shapes must match)."""
    saved = load_file(str(path))
    params = trainable_state(model)
    if set(saved) != set(params):
        raise DeltatuneError(f"{path} does not fit this model's trainable parameters "
                             f"(method or model changed since it was written?)")
    with torch.no_grad():
        for name, value in saved.items():
            params[name].copy_(value)


# --- nested state (optimizer, schedule) <-> JSON + tensors ---------------------------------

def _flatten(obj: Any, key: str, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, torch.Tensor):
        tensors[key] = obj
        return {"__tensor__": key}
    if isinstance(obj, dict):  # items keep their key types (optimizer state uses int keys)
        return {"__items__": [[k, _flatten(v, f"{key}.{k}", tensors)] for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        return [_flatten(v, f"{key}.{i}", tensors) for i, v in enumerate(obj)]
    return obj


def _unflatten(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict) and "__tensor__" in obj:
        return tensors[obj["__tensor__"]]
    if isinstance(obj, dict) and "__items__" in obj:
        return {k: _unflatten(v, tensors) for k, v in obj["__items__"]}
    if isinstance(obj, list):
        return [_unflatten(v, tensors) for v in obj]
    return obj


def _save_nested(state: dict, folder: Path, name: str) -> None:
    tensors: dict[str, torch.Tensor] = {}
    tree = _flatten(state, name, tensors)
    _save_tensors(tensors, folder / f"{name}.safetensors")
    (folder / f"{name}.json").write_text(json.dumps(tree))


def _load_nested(folder: Path, name: str, device: torch.device) -> dict:
    tensors = {k: v.to(device) for k, v in load_file(str(folder / f"{name}.safetensors")).items()}
    return _unflatten(json.loads((folder / f"{name}.json").read_text()), tensors)


# --- checkpoints ------------------------------------------------------------------------------

def _rng_states(dist: Dist) -> dict[str, torch.Tensor]:
    states = {f"cpu.{r}": t for r, t in enumerate(dist.gather_tensor(torch.get_rng_state()))}
    if dist.device.type == "cuda":
        cuda = dist.gather_tensor(torch.cuda.get_rng_state(dist.device))
        states.update({f"cuda.{r}": t for r, t in enumerate(cuda)})
    return states


def save(root: Path, model: nn.Module, optimizer, scheduler, state: dict, dist: Dist, keep: int) -> None:
    """Write checkpoint ``step-{state['step']}`` under ``root`` (rank 0 writes; every rank's RNG
    state goes in) and delete all but the ``keep`` newest."""
    rng = _rng_states(dist)  # a collective: every rank takes part
    # under FSDP, gathering the sharded weights and optimizer state is a collective too
    sharded = fsdp.is_sharded(model)
    optimizer_state = fsdp.optimizer_state(optimizer) if sharded else optimizer.state_dict()
    with fsdp.full_trainables(model):
        if dist.main:
            _write(root, model, optimizer_state, scheduler, rng, state, keep)
    dist.barrier()


def _write(root: Path, model: nn.Module, optimizer_state: dict, scheduler, rng: dict, state: dict, keep: int) -> None:
    def fill(folder: Path) -> None:
        _save_tensors(trainable_state(model), folder / WEIGHTS)
        _save_nested(optimizer_state, folder, "optimizer")
        (folder / "scheduler.json").write_text(json.dumps(scheduler.state_dict()))
        _save_tensors(rng, folder / "rng.safetensors")
        (folder / "state.json").write_text(json.dumps(state, indent=2))
    replace_dir(root / f"{PREFIX}{state['step']:07d}", fill)
    for old in sorted(root.glob(f"{PREFIX}*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def latest(root: Path) -> Path | None:
    """The newest complete checkpoint under ``root`` (temp leftovers of a killed run are removed)."""
    remove_leftovers(root)
    done = sorted(p for p in root.glob(f"{PREFIX}*") if (p / "state.json").is_file())
    return done[-1] if done else None


def restore(path: Path, model: nn.Module, optimizer, scheduler, dist: Dist, global_batch: int | None = None) -> dict:
    """Load checkpoint ``path`` into the model, optimizer and schedule; set this rank's RNG.
    Returns the loop state saved with it.

    The files hold whole tensors whatever the process count, so another count may resume a run
    when the global batch (``batch_size`` x processes) stays the same, and with it the data order.
    """
    state = json.loads((path / "state.json").read_text())
    saved_batch = state.get("global_batch")
    if saved_batch is None and state.get("world_size", 1) != dist.world_size:
        raise DeltatuneError(f"{path} was written by {state.get('world_size', 1)} processes; resume it with the "
                             f"same number (now {dist.world_size}) so the data order stays the same")
    if saved_batch is not None and global_batch is not None and saved_batch != global_batch:
        raise DeltatuneError(f"{path} was written with a global batch of {saved_batch} (train.batch_size x "
                             f"processes), now {global_batch}; set batch_size so that they match (the data order "
                             f"depends on it)")
    same_processes = state.get("world_size", 1) == dist.world_size
    state.update(world_size=dist.world_size, global_batch=global_batch or saved_batch)
    with fsdp.full_trainables(model, write_back=True):
        load_trainable(model, path / WEIGHTS)
    optimizer_state = _load_nested(path, "optimizer", dist.device)
    if fsdp.is_sharded(model):
        fsdp.load_optimizer_state(optimizer, optimizer_state)
    else:
        optimizer.load_state_dict(optimizer_state)
    scheduler.load_state_dict(json.loads((path / "scheduler.json").read_text()))
    if not same_processes:  # each process keeps its seeded RNG (only dropout draws differ)
        return state
    rng = load_file(str(path / "rng.safetensors"))
    torch.set_rng_state(rng[f"cpu.{dist.rank}"])
    if dist.device.type == "cuda" and f"cuda.{dist.rank}" in rng:
        torch.cuda.set_rng_state(rng[f"cuda.{dist.rank}"], dist.device)
    return state


def save_best(root: Path, model: nn.Module, info: dict, dist: Dist) -> None:
    """Keep the current trainable weights as ``best`` (rank 0 writes)."""
    with fsdp.full_trainables(model):
        if dist.main:
            def fill(folder: Path) -> None:
                _save_tensors(trainable_state(model), folder / WEIGHTS)
                (folder / "best.json").write_text(json.dumps(info, indent=2))
            replace_dir(root / "best", fill)
    dist.barrier()


def restore_best(root: Path, model: nn.Module) -> dict | None:
    """Load the best weights kept so far; returns their info, or None if there are none."""
    folder = root / "best"
    if not (folder / "best.json").is_file():
        return None
    with fsdp.full_trainables(model, write_back=True):
        load_trainable(model, folder / WEIGHTS)
    return json.loads((folder / "best.json").read_text())
