"""Distributed data parallel under ``torchrun``: process group set-up (gloo on CPU, NCCL on
GPU), the few collective operations the loop needs, and rank-0-only file writing."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from deltatune.errors import ConfigError


@dataclass(frozen=True)
class Dist:
    """Where this process stands: its rank, the number of processes, and its device."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        """Rank 0: the process that writes files and prints."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def sum(self, value: float) -> float:
        """``value`` summed over all processes."""
        if not self.active:
            return value
        t = torch.tensor([float(value)], dtype=torch.float64, device=self._comm_device)
        dist.all_reduce(t)
        return float(t.item())

    def broadcast(self, obj):
        """Rank 0's ``obj`` (a small picklable value produced by this program) on every rank."""
        if not self.active:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0, device=self._comm_device)
        return box[0]

    def gather_tensor(self, t: torch.Tensor) -> list[torch.Tensor]:
        """``t`` (same shape everywhere) from every rank, on every rank, on the CPU."""
        if not self.active:
            return [t]
        t = t.to(self._comm_device)
        out = [torch.empty_like(t) for _ in range(self.world_size)]
        dist.all_gather(out, t)
        return [o.cpu() for o in out]

    @property
    def _comm_device(self) -> torch.device:
        return self.device if dist.get_backend() == "nccl" else torch.device("cpu")


def launched() -> bool:
    """Whether this process was started by torchrun (or another launcher setting WORLD_SIZE)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def setup(device: str = "auto") -> Dist:
    """Join the process group when launched by torchrun; pick this process's device."""
    want_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device is cuda, but no CUDA GPU is visible; use device: auto or cpu")
    if device not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"train.device must be auto, cpu or cuda; got {device!r}")
    if not launched():
        return Dist(0, 1, torch.device("cuda" if want_cuda else "cpu"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if want_cuda:
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if want_cuda else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size(), dev)


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
