"""Task-vector merges applied to LoRA factors: TIES, DARE and magnitude pruning.

Each merge takes the same-shaped tensors of several adapters (all their A factors, or all their B
factors) with one weight per adapter and returns one tensor, as peft's ``add_weighted_adapter``
defines these combination types:

- ``magnitude_prune``: keep each tensor's ``density`` fraction of largest-magnitude entries, then
  add the weighted tensors.
- ``ties`` (Yadav et al. 2023): prune as above; per entry, elect the sign of the (unweighted) sum;
  average the weighted entries that agree with it (entries that disagree, or were pruned, drop out).
- ``dare_linear`` (Yu et al. 2023): drop each entry with probability ``1 - density`` and rescale the
  survivors by ``1 / density`` (unbiased), then add the weighted tensors.
- ``dare_ties``: DARE's random drop, then TIES's sign election and disjoint mean.
"""

from __future__ import annotations

from typing import Sequence

import torch

TASK_MERGES = ("ties", "dare_linear", "dare_ties", "magnitude_prune")
SIGN_RULES = ("total", "frequency")


def keep_largest(tensor: torch.Tensor, density: float) -> torch.Tensor:
    """``tensor`` with all but its ``int(density * numel)`` largest-magnitude entries set to zero."""
    if density >= 1:
        return tensor
    keep = int(density * tensor.numel())
    mask = torch.zeros(tensor.numel(), dtype=torch.bool, device=tensor.device)
    mask[tensor.abs().flatten().topk(keep).indices] = True
    return tensor * mask.view(tensor.shape)


def drop_at_random(tensor: torch.Tensor, density: float, generator: torch.Generator) -> torch.Tensor:
    """DARE: each entry kept with probability ``density``; survivors scaled by ``1 / density``."""
    if density >= 1:
        return tensor
    kept = (torch.rand(tensor.shape, generator=generator) < density).to(tensor.device)  # a CPU generator
    return tensor * kept / density


def agreeing_mean(tensors: torch.Tensor, weights: torch.Tensor, sign_rule: str) -> torch.Tensor:
    """TIES's election and disjoint merge over ``tensors`` stacked on dim 0: per entry, the mean of
    the weighted values whose sign matches the elected one ("total": the sign of the sum of the
    values, "frequency": the more frequent sign; ties go to +)."""
    signs = tensors.sign()
    votes = tensors.sum(0) if sign_rule == "total" else signs.sum(0)
    elected = torch.where(votes >= 0, 1.0, -1.0).to(tensors.dtype)
    agree = signs == elected
    weighted = tensors * weights.view(-1, *[1] * (tensors.dim() - 1))
    return (weighted * agree).sum(0) / agree.sum(0).clamp_min(1)


def merge_tensors(tensors: Sequence[torch.Tensor], weights: Sequence[float], how: str, density: float,
                  generator: torch.Generator, sign_rule: str = "total") -> torch.Tensor:
    """One combined tensor from same-shaped ``tensors`` by merge ``how`` (see the module docstring)."""
    if how in ("ties", "magnitude_prune"):
        kept = [keep_largest(t, density) for t in tensors]
    else:
        kept = [drop_at_random(t, density, generator) for t in tensors]
    stacked = torch.stack(kept)
    w = torch.tensor(list(weights), dtype=stacked.dtype, device=stacked.device)
    if how in ("ties", "dare_ties"):
        return agreeing_mean(stacked, w, sign_rule)
    return (stacked * w.view(-1, *[1] * (stacked.dim() - 1))).sum(0)
