"""Weighted combination of LoRA adapters into a new adapter ("toy" 0.7 + "dog" 0.5).

``cat`` is exact: the new factors stack the weighted old ones, rank = sum of ranks.
``svd`` is the exact weighted sum of the updates truncated to ``rank`` by SVD (reports the
energy kept). ``linear`` adds weighted factors of equal rank, as image-LoRA blending tools do:
cheap and the same rank, but not the sum of the updates (cross terms appear).

Trained head copies (``modules_to_save``) are not blended: the combined adapter uses the base
model's head, so combine adapters that share a head (or generation models).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from deltatune.core.layer import ModulesToSave
from deltatune.core.model import AdaptedModel
from deltatune.errors import AdapterError, ConfigError
from deltatune.methods.lora import LoraConfig, LoraConv2d, LoraLinear

_HOW = ("linear", "cat", "svd")


@dataclass(frozen=True)
class CombineReport:
    """What a combination produced: the new adapter's rank per module and SVD energy kept."""

    name: str
    how: str
    ranks: dict[str, int]
    energy_kept: dict[str, float]

    @property
    def min_energy_kept(self) -> float:
        return min(self.energy_kept.values(), default=1.0)


def _sources(model: AdaptedModel, weights: dict[str, float], how: str) -> list[tuple[str, LoraLinear]]:
    for name in weights:
        model._check(name)
        if not isinstance(model.configs[name], LoraConfig):
            raise AdapterError(f"combine works on LoRA adapters; {name!r} is a {type(model.configs[name]).__name__}")
    layers = [(p, layer) for p, layer in model.adapter_layers()
              if set(weights) & set(layer.adapter_names) and not isinstance(layer, ModulesToSave)]
    # a conv's factors stack and add like a linear's (A: r x in x kh x kw, B: out x r x 1 x 1); SVD needs matrices
    kinds = (LoraLinear,) if how == "svd" else (LoraLinear, LoraConv2d)
    others = [p for p, layer in layers if not isinstance(layer, kinds)]
    if others:
        raise AdapterError(f"combine how={how!r} supports LoRA on {' and '.join(k.__name__ for k in kinds)} "
                           f"layers; {others[0]} is not one")
    return layers


def _factors(layer: LoraLinear, weights: dict[str, float], how: str, rank: int | None):
    """New (A, B, energy) for one layer; the new adapter's scale is 1."""
    present = [(n, w) for n, w in weights.items() if n in layer.adapter_names]
    if how == "cat":
        a = torch.cat([w * layer.scaling[n] * layer.lora_A[n].weight for n, w in present])
        b = torch.cat([layer.lora_B[n].weight for n, _ in present], dim=1)
        return a, b, 1.0
    if how == "linear":
        ranks = {layer.r[n] for n, _ in present}
        if len(ranks) > 1:
            raise AdapterError(f"how='linear' needs equal ranks, got {sorted(ranks)}; use 'cat' or 'svd'")
        # the sign goes to A; sqrt of |weight x scale| to each factor
        a = sum(math.copysign(math.sqrt(abs(w * layer.scaling[n])), w) * layer.lora_A[n].weight for n, w in present)
        b = sum(math.sqrt(abs(w * layer.scaling[n])) * layer.lora_B[n].weight for n, w in present)
        return a, b, 1.0
    delta = sum(w * layer.scaling[n] * (layer.lora_B[n].weight @ layer.lora_A[n].weight) for n, w in present)
    u, s, vh = torch.linalg.svd(delta.float(), full_matrices=False)
    k = min(rank, sum(layer.r[n] for n, _ in present))  # beyond that the singular values are zero
    energy = float((s[:k] ** 2).sum() / (s ** 2).sum().clamp_min(1e-30))
    root = s[:k].sqrt()
    return (root[:, None] * vh[:k]).to(delta.dtype), (u[:, :k] * root).to(delta.dtype), energy


def combine(model: AdaptedModel, weights: dict[str, float], name: str, how: str = "cat",
            rank: int | None = None) -> CombineReport:
    """Add adapter ``name`` = the weighted combination of existing LoRA adapters."""
    if how not in _HOW:
        raise ConfigError(f"how must be one of {_HOW}, got {how!r}")
    if not weights:
        raise ConfigError("weights is empty: name at least one adapter, e.g. {'toy': 0.7}")
    if how == "svd" and (rank is None or rank < 1):
        raise ConfigError("how='svd' needs a target rank, e.g. rank=8")
    if name in model.configs:
        raise AdapterError(f"an adapter named {name!r} exists already")
    layers = _sources(model, weights, how)
    with torch.no_grad():  # the combination is a fixed adapter: no graph through its sources
        built = {path: _factors(layer, weights, how, rank) for path, layer in layers}
    ranks = {path: a.shape[0] for path, (a, _, _) in built.items()}
    common = max(set(ranks.values()), key=list(ranks.values()).count)
    first = model.configs[next(iter(weights))]
    config = LoraConfig(r=common, alpha=common, targets=[p for p, _ in layers],
                        rank_pattern={p.replace(".", r"\."): r for p, r in ranks.items() if r != common},
                        alpha_pattern={p.replace(".", r"\."): r for p, r in ranks.items() if r != common},
                        modules_to_save=(), task_type=first.task_type, base_model=first.base_model)
    model.add(config, name, trainable=False)
    with torch.no_grad():
        for path, layer in layers:
            a, b, _ = built[path]
            layer.lora_A[name].weight.copy_(a)
            layer.lora_B[name].weight.copy_(b)
    return CombineReport(name, how, ranks, {p: e for p, (_, _, e) in built.items()})
