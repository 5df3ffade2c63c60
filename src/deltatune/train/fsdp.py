"""Fully sharded training (``train.distributed: fsdp``) with PyTorch's FSDP2 ``fully_shard``.

Each transformer block (and the embeddings) becomes one FSDP unit, the adapted model the root
unit: every process keeps ``1 / world_size`` of each parameter, frozen base and adapter alike,
and gathers a block's full weights only while that block runs. The optimizer is built on the
sharded adapter parameters, so its state is sharded too. Frozen and trainable parameters may
share a unit: FSDP2 reduces gradients only for those that have them.

Files stay the ordinary single-file ones: :func:`full_trainables` gathers the (small) trained
parameters on every process for the time a checkpoint or the adapter folder is written or read,
and the optimizer state is saved gathered too.
"""

from __future__ import annotations

import contextlib
import os
import sys
from typing import Iterator

import torch
from torch import nn

from deltatune.errors import ConfigError
from deltatune.train.distributed import Dist


class _NothingIsOne:
    """A class no object is an instance of."""


def _loaded(module: str, name: str) -> type:
    """``module.name`` when ``module`` is imported, else a class nothing is an instance of. A
    process that never imported FSDP or DTensor holds no sharded module and no DTensor, and
    importing them costs about a second of every run's start-up, sharded or not."""
    loaded = sys.modules.get(module)
    return getattr(loaded, name, _NothingIsOne) if loaded is not None else _NothingIsOne


def _fsdp_module() -> type:
    return _loaded("torch.distributed.fsdp", "FSDPModule")


def _dtensor() -> type:
    return _loaded("torch.distributed.tensor", "DTensor")


def shard_units(model: nn.Module) -> list[nn.Module]:
    """The modules that become their own FSDP unit: the classes a transformers model lists in
    ``_no_split_modules`` (its blocks, often the embeddings), else the members of the longest
    ``nn.ModuleList`` (the block stack)."""
    names = set()
    for module in model.modules():
        names.update(getattr(module, "_no_split_modules", None) or ())
    units = [m for m in model.modules() if type(m).__name__ in names]
    if not units:
        stacks = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) > 1]
        units = list(max(stacks, key=len)) if stacks else []
    return units


def strategy(configured: str) -> str:
    """How several processes share the work: the recipe's ``train.distributed``, or ``fsdp``
    when ``accelerate launch --use_fsdp`` started them (it says so in ``ACCELERATE_USE_FSDP``)."""
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true":
        raise ConfigError("accelerate launch --use_deepspeed: deltatune's training loop shards with PyTorch FSDP2, "
                          "not DeepSpeed; launch with --use_fsdp (or set train.distributed: fsdp), see "
                          "docs/distributed.md")
    return "fsdp" if os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true" else configured


def _prepare_quantized(model: nn.Module) -> None:
    """Let bitsandbytes 4-bit layers run sharded; refuse any other special parameter.

    FSDP2 shards a 4-bit layer's packed bytes like any tensor, but the weight it gathers for the
    forward is a plain tensor without the quantization state. bitsandbytes restores that state
    from the layer's ``quant_state`` attribute (its own provision for FSDP), so it is set here.
    """
    for module in model.modules():
        weight = module._parameters.get("weight")
        state = getattr(weight, "quant_state", None)
        if state is not None and hasattr(module, "quant_storage"):
            module.quant_state = state
            # its CPU inference repacking rewrites the weight in place: not a gathered copy's job
            module.support_avx512bf16_for_cpu = False
    for name, param in model.named_parameters():
        if type(param) is not nn.Parameter and getattr(param, "quant_state", None) is None:
            raise ConfigError(
                f"train.distributed: fsdp cannot shard {name}, a {type(param).__name__}: its extra state (e.g. "
                f"8-bit quantization statistics) would be lost when FSDP gathers it. Use 4-bit quantization "
                f"(quantize.bits: 4), or train.distributed: ddp")


def check_optimizer(name: str) -> None:
    """Refuse an optimizer that cannot step sharded parameters."""
    if name == "adamw8bit":
        raise ConfigError("train.optimizer: adamw8bit does not take FSDP's sharded parameters; use optimizer: adamw "
                          "with train.distributed: fsdp (its state is sharded anyway), or distributed: ddp")


def shard(model: nn.Module, dist: Dist, offload: bool = False) -> nn.Module:
    """Shard ``model`` in place over all processes (one FSDP unit per block, then the root).

    ``offload`` keeps the shards (and so the adapters' gradients and optimizer state) in CPU
    memory between uses; it matters on GPUs, where it trades transfer time for device memory.
    """
    _prepare_quantized(model)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy, fully_shard

    mesh = init_device_mesh(dist.device.type, (dist.world_size,))
    policy = CPUOffloadPolicy(pin_memory=dist.device.type == "cuda") if offload else OffloadPolicy()
    units = shard_units(model)
    if not units:
        raise ConfigError(f"train.distributed: fsdp found no transformer blocks to shard in "
                          f"{type(model).__name__}; use train.distributed: ddp for this model")
    # innermost first: fully_shard on a module leaves parameters already in an inner unit to it
    for unit in sorted(units, key=lambda m: -_depth(model, m)):
        fully_shard(unit, mesh=mesh, offload_policy=policy)
    fully_shard(model, mesh=mesh, offload_policy=policy)
    return model


def _depth(root: nn.Module, target: nn.Module) -> int:
    for name, module in root.named_modules():
        if module is target:
            return name.count(".") + 1
    return 0


def is_sharded(model: nn.Module) -> bool:
    """Whether ``model`` (or a module inside it) was sharded by :func:`shard`."""
    sharded = _fsdp_module()
    return isinstance(model, sharded) or any(isinstance(m, sharded) for m in model.modules())


@contextlib.contextmanager
def full_trainables(model: nn.Module, write_back: bool = False) -> Iterator[None]:
    """Within the block, the model's trainable parameters are whole tensors (gathered from all
    processes), so code that reads or writes adapter weights works unchanged; with
    ``write_back`` what was written into them is scattered back into the shards on exit.

    A collective operation under FSDP (every process enters it); nothing happens otherwise.
    """
    if not is_sharded(model):
        yield
        return
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor, distribute_tensor

    for module in model.modules():  # the root keeps its last-gathered weights after a forward
        if isinstance(module, FSDPModule):
            module.reshard()
    swapped = []
    for module in model.modules():
        for name, param in list(module._parameters.items()):
            if isinstance(param, DTensor) and param.requires_grad:
                whole = nn.Parameter(param.full_tensor().detach().clone())
                module._parameters[name] = whole
                swapped.append((module, name, param, whole))
    completed = False
    try:
        yield
        completed = True
    finally:
        for module, name, sharded, whole in swapped:
            if write_back and completed:
                with torch.no_grad():
                    sharded.copy_(distribute_tensor(whole.detach().to(sharded.dtype), sharded.device_mesh,
                                                    sharded.placements))
            module._parameters[name] = sharded


def _params_in_order(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    # the order that numbers the parameters in optimizer.state_dict()
    return [p for group in optimizer.param_groups for p in group["params"]]


def optimizer_state(optimizer: torch.optim.Optimizer) -> dict:
    """``optimizer.state_dict()`` with every sharded tensor gathered whole: the same for any
    number of processes. A collective operation (every process calls it)."""
    state = optimizer.state_dict()  # its per-parameter dicts are the optimizer's own: not changed here
    dtensor = _dtensor()
    state["state"] = {index: {key: value.full_tensor() if isinstance(value, dtensor) else value
                              for key, value in per_param.items()}
                      for index, per_param in state["state"].items()}
    return state


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Load a state written by :func:`optimizer_state`, each process keeping its shards."""
    params = _params_in_order(optimizer)
    for index, per_param in state["state"].items():
        param = params[index]
        if not isinstance(param, _dtensor()):
            continue
        from torch.distributed.tensor import distribute_tensor
        for key, value in per_param.items():
            if isinstance(value, torch.Tensor) and value.shape == param.shape:
                per_param[key] = distribute_tensor(value.to(param.device), param.device_mesh, param.placements)
    optimizer.load_state_dict(state)


@contextlib.contextmanager
def gradient_sync_paused(model: nn.Module) -> Iterator[None]:
    """No gradient all-reduce / reduce-scatter inside the block (gradient accumulation's
    non-final micro-batches), for a DDP- or FSDP-wrapped model."""
    model = getattr(model, "_orig_mod", model)  # under torch.compile
    if isinstance(model, _fsdp_module()):
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    else:
        with model.no_sync():
            yield


def local_parameter_bytes(model: nn.Module) -> int:
    """Bytes of parameter storage this process holds (its shards under FSDP), measured."""
    total, dtensor = 0, _dtensor()
    for param in model.parameters():
        local = param.to_local() if isinstance(param, dtensor) else param
        total += local.numel() * local.element_size()
    return total
