"""Weighted combination of LoRA adapters into a new adapter ("toy" 0.7 + "dog" 0.5).

``cat`` is exact: the new factors stack the weighted old ones, rank = sum of ranks.
``svd`` is the exact weighted sum of the updates truncated to ``rank`` by SVD (reports the
energy kept). ``linear`` adds weighted factors of equal rank, as image-LoRA blending tools do:
cheap and the same rank, but not the sum of the updates (cross terms appear). ``ties``,
``dare_linear``, ``dare_ties`` and ``magnitude_prune`` are peft's task-vector merges applied to
the factors like ``linear`` (see :mod:`deltatune.compose.task_merging`), with ``density`` the
fraction of entries kept and ``seed`` fixing DARE's random drop.

Trained head copies (``modules_to_save``, e.g. a classifier) combine as task vectors: the new
head is ``base + sum_i w_i (head_i - base)`` over the adapters that have a copy (with weights that
sum to one and a copy in every adapter, the weighted average of the heads); the task-vector merges
prune those changes first, as they do the factors. (peft's ``add_weighted_adapter`` refuses two
adapters with copies of one module, and gives the combination a fresh copy of the base's.)

Works through the factor interface of LoRA layers (:meth:`LoraLayer.factors`), on Linear, Conv1D,
Embedding and Conv2d layers; the methods are LoRA-only: other methods, DoRA adapters, fused expert
weights and trained biases (the ``bias`` option) have no combination here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from deltatune.compose.task_merging import SIGN_RULES, TASK_MERGES, merge_tensors
from deltatune.core.layer import ModulesToSave
from deltatune.core.model import AdaptedModel
from deltatune.errors import AdapterError, ConfigError
from deltatune.methods.lora import LoraConfig, LoraLayer
from deltatune.methods.lora.experts import LoraExperts
from deltatune.methods.lora.factors import LoraFactors

_HOW = ("linear", "cat", "svd", *TASK_MERGES)


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


@dataclass(frozen=True)
class _MergeOptions:
    how: str
    rank: int | None
    density: float
    sign_rule: str
    generator: torch.Generator


def _sources(model: AdaptedModel, weights: dict[str, float], how: str) -> list[tuple[str, LoraLayer]]:
    for name in weights:
        model._check(name)
        config = model.configs[name]
        if not isinstance(config, LoraConfig):
            raise AdapterError(f"combine works on LoRA adapters only; {name!r} is a {type(config).__name__}")
        if config.dora:
            raise AdapterError(f"{name!r} is a DoRA adapter, whose magnitudes have no weighted combination; "
                               f"merge it into the weights instead (merge_and_unload)")
        if config.bias != "none":
            raise AdapterError(f"{name!r} also trains base biases (bias={config.bias!r}), which combine does not "
                               f"blend; combine adapters trained with bias='none', or merge this one instead")
    layers = [(p, layer) for p, layer in model.adapter_layers()
              if set(weights) & set(layer.adapter_names) and not isinstance(layer, ModulesToSave)]
    others = [p for p, layer in layers if not isinstance(layer, LoraLayer) or isinstance(layer, LoraExperts)]
    if others:
        raise AdapterError(f"combine how={how!r} supports LoRA on Linear, Conv1D, Embedding and Conv2d layers; "
                           f"{others[0]} is not one (fused expert weights are not combined)")
    return layers


def _factors(layer: LoraLayer, weights: dict[str, float], opts: _MergeOptions) -> tuple[LoraFactors, float]:
    """The new adapter's factors for one layer (scale 1) and the SVD energy kept."""
    present = [(n, w) for n, w in weights.items() if n in layer.adapter_names]
    factors = {n: layer.factors(n) for n, _ in present}
    if opts.how == "cat":
        a = torch.cat([w * factors[n].scale * factors[n].a for n, w in present])
        return LoraFactors(a, torch.cat([factors[n].b for n, _ in present], dim=1), 1.0), 1.0
    if opts.how != "svd":
        ranks = {factors[n].rank for n, _ in present}
        if len(ranks) > 1:
            raise AdapterError(f"how={opts.how!r} needs equal ranks, got {sorted(ranks)}; use 'cat' or 'svd'")
        # the sign goes to A; sqrt of |weight x scale| to each factor
        roots = [math.sqrt(abs(w * factors[n].scale)) for n, w in present]
        signed = [math.copysign(root, w) for root, (_, w) in zip(roots, present)]
        a_list, b_list = [factors[n].a for n, _ in present], [factors[n].b for n, _ in present]
        if opts.how == "linear":
            a, b = sum(s * a for s, a in zip(signed, a_list)), sum(r * b for r, b in zip(roots, b_list))
        else:
            a = merge_tensors(a_list, signed, opts.how, opts.density, opts.generator, opts.sign_rule)
            b = merge_tensors(b_list, roots, opts.how, opts.density, opts.generator, opts.sign_rule)
        return LoraFactors(a, b, 1.0), 1.0
    delta = sum(w * factors[n].scale * (factors[n].b @ factors[n].a) for n, w in present)
    u, s, vh = torch.linalg.svd(delta.float(), full_matrices=False)
    k = min(opts.rank, sum(factors[n].rank for n, _ in present))  # beyond that the singular values are zero
    energy = float((s[:k] ** 2).sum() / (s ** 2).sum().clamp_min(1e-30))
    root = s[:k].sqrt()
    return LoraFactors((root[:, None] * vh[:k]).to(delta.dtype), (u[:, :k] * root).to(delta.dtype), 1.0), energy


def _head_copies(model: AdaptedModel, weights: dict[str, float]) -> list[tuple[str, ModulesToSave]]:
    """The trained-copy wrappers (heads) where at least one of the combined adapters has a copy."""
    return [(p, layer) for p, layer in model.adapter_layers()
            if isinstance(layer, ModulesToSave) and set(weights) & set(layer.adapter_names)]


def _combined_head(layer: ModulesToSave, weights: dict[str, float], opts: _MergeOptions) -> dict[str, torch.Tensor]:
    """The new copy's tensors: the base's plus the weighted (for task-vector merges: merged)
    changes of the adapters' copies from it."""
    copies = {n: layer.modules_to_save[n].state_dict() for n in weights if n in layer.adapter_names}
    scales = [weights[n] for n in copies]
    out = {}
    for key, value in layer.base_layer.state_dict().items():
        if not value.is_floating_point():
            out[key] = value
            continue
        changes = [held[key] - value for held in copies.values()]
        if opts.how in TASK_MERGES:
            change = merge_tensors(changes, scales, opts.how, opts.density, opts.generator, opts.sign_rule)
        else:
            change = sum(w * c for w, c in zip(scales, changes))
        out[key] = value + change
    return out


def _check_options(how: str, weights: dict, rank: int | None, density: float | None, sign_rule: str) -> None:
    if how not in _HOW:
        raise ConfigError(f"how must be one of {_HOW}, got {how!r}")
    if not weights:
        raise ConfigError("weights is empty: name at least one adapter, e.g. {'toy': 0.7}")
    if how == "svd" and (rank is None or rank < 1):
        raise ConfigError("how='svd' needs a target rank, e.g. rank=8")
    if how in TASK_MERGES:
        if isinstance(density, bool) or not isinstance(density, (int, float)) or not 0 < density <= 1:
            raise ConfigError(f"how={how!r} needs density, the fraction of entries kept, in (0, 1], "
                              f"e.g. density=0.5; got {density!r}")
    elif density is not None:
        raise ConfigError(f"density applies to {TASK_MERGES}, not to how={how!r}")
    if sign_rule not in SIGN_RULES:
        raise ConfigError(f"majority_sign must be one of {SIGN_RULES}, got {sign_rule!r}")


def combine(model: AdaptedModel, weights: dict[str, float], name: str, how: str = "cat",
            rank: int | None = None, *, density: float | None = None, seed: int = 0,
            majority_sign: str = "total") -> CombineReport:
    """Add adapter ``name`` = the weighted combination of existing LoRA adapters.

    ``density`` (the fraction of entries kept) is required by the task-vector merges ``ties``,
    ``dare_linear``, ``dare_ties`` and ``magnitude_prune``; ``seed`` fixes DARE's random drop;
    ``majority_sign`` is TIES's sign election, ``"total"`` or ``"frequency"`` (as in peft).
    """
    _check_options(how, weights, rank, density, majority_sign)
    if name in model.configs:
        raise AdapterError(f"an adapter named {name!r} exists already")
    layers = _sources(model, weights, how)
    heads = _head_copies(model, weights)
    opts = _MergeOptions(how, rank, float(density or 1.0), majority_sign, torch.Generator().manual_seed(seed))
    with torch.no_grad():  # the combination is a fixed adapter: no graph through its sources
        built = {path: _factors(layer, weights, opts) for path, layer in layers}
        head_states = {path: _combined_head(layer, weights, opts) for path, layer in heads}
    ranks = {path: f.rank for path, (f, _) in built.items()}
    common = max(set(ranks.values()), key=list(ranks.values()).count)
    first = model.configs[next(iter(weights))]
    config = LoraConfig(r=common, alpha=common, targets=[p for p, _ in layers],
                        rank_pattern={p.replace(".", r"\."): r for p, r in ranks.items() if r != common},
                        alpha_pattern={p.replace(".", r"\."): r for p, r in ranks.items() if r != common},
                        modules_to_save=tuple(head_states), task_type=first.task_type, base_model=first.base_model)
    model.add(config, name, trainable=False)
    for path, layer in layers:
        factors, _ = built[path]
        layer.set_factors(name, factors.a, factors.b)
    with torch.no_grad():
        for path, layer in heads:
            held = layer.modules_to_save[name].state_dict()
            for key, value in head_states[path].items():
                held[key].copy_(value)
    return CombineReport(name, how, ranks, {p: e for p, (_, e) in built.items()})
