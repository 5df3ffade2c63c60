"""The hard-concrete gate (Louizos et al. 2018, "Learning Sparse Neural Networks through L0
Regularization"): a stretched, clamped binary-concrete variable that is exactly 0 or 1 with
nonzero probability, so the expected number of open gates is differentiable."""

from __future__ import annotations

import math

import torch

BETA = 2.0 / 3.0  # temperature
LIMIT_L = -0.1  # stretch interval (l, r): the sigmoid is stretched to it, then clamped to [0, 1]
LIMIT_R = 1.1
_EPS = 1e-6
_SHIFT = BETA * math.log(-LIMIT_L / LIMIT_R)


def sample_gates(log_alpha: torch.Tensor) -> torch.Tensor:
    """One stochastic gate per entry (training)."""
    u = torch.rand_like(log_alpha).clamp(_EPS, 1.0 - _EPS)
    s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + log_alpha) / BETA)
    return (s * (LIMIT_R - LIMIT_L) + LIMIT_L).clamp(0.0, 1.0)


def deterministic_gates(log_alpha: torch.Tensor) -> torch.Tensor:
    """The test-time gate: exactly 0 for log_alpha <= -2.4, exactly 1 for log_alpha >= 2.4."""
    return (torch.sigmoid(log_alpha) * (LIMIT_R - LIMIT_L) + LIMIT_L).clamp(0.0, 1.0)


def open_probability(log_alpha: torch.Tensor) -> torch.Tensor:
    """P(gate != 0) per entry: the differentiable expected L0 norm, entry by entry."""
    return torch.sigmoid(log_alpha - _SHIFT)
