"""The optimizer over exactly the parameters with ``requires_grad``, its parameter groups
(weight decay, per-layer LR decay, LoRA+), and the warm-up + decay learning-rate schedule."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from deltatune.core.archspec import spec_for
from deltatune.errors import ConfigError, DeltatuneError
from deltatune.train.recipe import TrainSpec

_NO_DECAY = ("bias", "LayerNorm.weight", "layer_norm.weight", "layernorm.weight", "norm.weight", "ln_")
_LORA_B = (".lora_B.", ".lora_embedding_B.")


@dataclass
class Group:
    """One parameter group: its parameters (with names, for reports) and LR multiplier."""

    names: list[str]
    params: list[nn.Parameter]
    lr_scale: float
    weight_decay: float


def _base_model(model: nn.Module) -> nn.Module:
    return getattr(model, "base_model", model) if hasattr(model, "adapter_layers") else model


def layer_ids(model: nn.Module) -> tuple[dict[str, int], int]:
    """``({parameter name: layer id}, number of ids)`` for per-layer LR decay.

    Embeddings get id 0, transformer block ``i`` id ``i + 1`` (from the architecture's block
    paths), everything else (heads, final norms) the top id. Names are relative to the base
    model, whatever wraps it.
    """
    base = _base_model(model)
    spec = spec_for(base)
    blocks: dict[str, int] = {}
    for name, param in base.named_parameters():
        if param.requires_grad:
            where = spec.split(name)
            if where is not None:
                blocks[name] = where[1] + 1
    top = max(blocks.values(), default=0) + 1
    ids = {}
    for name, param in base.named_parameters():
        if not param.requires_grad:
            continue
        if name in blocks:
            ids[name] = blocks[name]
        elif "embed" in name or ".wte." in f".{name}" or ".wpe." in f".{name}" or "shared." in name:
            ids[name] = 0
        else:
            ids[name] = top
    return ids, top + 1


def parameter_groups(model: nn.Module, spec: TrainSpec) -> list[Group]:
    """The trainable parameters, grouped by LR multiplier and weight decay.

    ``layer_decay`` d scales block ``i``'s LR by ``d ** (top - id)`` (the head keeps the full LR);
    ``lora_plus_ratio`` multiplies the LR of LoRA's B matrices (LoRA+, Hayou et al. 2024).
    """
    base = _base_model(model)
    named = [(n, p) for n, p in base.named_parameters() if p.requires_grad]
    own = {id(p) for _, p in named}
    # parameters outside the base model (e.g. prompt encoders of the wrapper) train too
    named += [(n, p) for n, p in model.named_parameters() if p.requires_grad and id(p) not in own]
    if not named:
        raise DeltatuneError("the model has no trainable parameters: the method froze everything")
    ids, n_ids = layer_ids(model) if spec.layer_decay is not None else ({}, 0)
    if spec.lora_plus_ratio is not None and not any(any(k in f".{n}" for k in _LORA_B) for n, _ in named):
        raise ConfigError("train.lora_plus_ratio sets the LR of LoRA's B matrices, but this method has none")
    groups: dict[tuple[float, float], Group] = {}
    for name, param in named:
        scale = 1.0
        if spec.layer_decay is not None:
            scale *= spec.layer_decay ** (n_ids - 1 - ids.get(name, n_ids - 1))
        if spec.lora_plus_ratio is not None and any(k in f".{name}" for k in _LORA_B):
            scale *= spec.lora_plus_ratio
        decay = 0.0 if (param.ndim < 2 or any(k in name for k in _NO_DECAY)) else spec.weight_decay
        group = groups.setdefault((scale, decay), Group([], [], scale, decay))
        group.names.append(name)
        group.params.append(param)
    return list(groups.values())


def _optimizer_groups(model: nn.Module, spec: TrainSpec) -> list[dict]:
    return [{"params": g.params, "lr": spec.lr * g.lr_scale, "weight_decay": g.weight_decay}
            for g in parameter_groups(model, spec)]


def lora_plus_groups(model: nn.Module, lr: float, ratio: float = 16.0, weight_decay: float = 0.0) -> list[dict]:
    """LoRA+ (Hayou et al. 2024) parameter groups for any torch optimizer: LoRA's B matrices
    train at ``ratio * lr``, every other trainable parameter at ``lr``; biases and norms get no
    weight decay. ``torch.optim.AdamW(lora_plus_groups(model, 2e-4), lr=2e-4)``, or pass the
    optimizer to a transformers ``Trainer(optimizers=(opt, None))``."""
    return _optimizer_groups(model, TrainSpec(lr=lr, lora_plus_ratio=ratio, weight_decay=weight_decay))


def build_optimizer(model: nn.Module, spec: TrainSpec) -> torch.optim.Optimizer:
    """AdamW (or bitsandbytes' 8-bit AdamW) over the trainable parameters, grouped."""
    groups = _optimizer_groups(model, spec)
    if spec.optimizer == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise ConfigError("train.optimizer: adamw8bit needs bitsandbytes: pip install 'deltatune[quant]'") from None
        return bnb.optim.AdamW8bit(groups, lr=spec.lr)
    return torch.optim.AdamW(groups, lr=spec.lr)


def warmup_steps(spec: TrainSpec, total_steps: int) -> int:
    """``warmup`` below 1 is a fraction of the run, from 1 up a step count."""
    return math.ceil(spec.warmup * total_steps) if spec.warmup < 1 else int(spec.warmup)


def build_schedule(optimizer: torch.optim.Optimizer, spec: TrainSpec, total_steps: int):
    """transformers' warm-up schedules: the LR climbs linearly from 0 over the warm-up steps,
    then decays linearly or along a half cosine to 0 at ``total_steps`` (or stays constant).

    The same factors as ``transformers.get_scheduler`` (tests compare them step by step), written
    here because importing that function loads transformers' Trainer utilities, and with them
    peft and bitsandbytes: seconds of every run's start-up.
    """
    warmup = warmup_steps(spec, total_steps)
    shape = spec.schedule

    def factor(step: int) -> float:
        if step < warmup:
            return step / max(1, warmup)
        if shape == "constant":
            return 1.0
        if shape == "linear":
            return max(0.0, (total_steps - step) / max(1, total_steps - warmup))
        progress = (step - warmup) / max(1, total_steps - warmup)
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))

    if shape not in ("linear", "cosine", "constant"):
        raise ConfigError(f"train.schedule must be linear, cosine or constant, got {shape!r}")
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
