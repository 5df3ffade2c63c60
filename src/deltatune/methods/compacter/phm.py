"""Parameterized hypercomplex multiplication (PHM) layers (Zhang et al. 2021) and the Compacter
bottleneck built from two of them."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from deltatune.methods.adapters.layer import make_activation


def kronecker_sum(rule: torch.Tensor, fast: torch.Tensor) -> torch.Tensor:
    """``sum_i kron(rule[i], fast[i])`` for ``rule`` (``n x n x n``) and ``fast`` (``n x p x q``):
    an ``n p x n q`` matrix."""
    n, p, q = fast.shape
    return torch.einsum("iab,icd->acbd", rule, fast).reshape(n * p, n * q)


class PHMLinear(nn.Module):
    """``y = W x + b`` with ``W = sum_i A_i kron B_i`` (``out x in``).

    ``A`` (the slow weights) is not held here but passed to :meth:`forward`, because one ``A``
    serves every PHM layer of an adapter. ``B_i = s_i t_i`` when ``rank`` is set (tensors ``s``:
    ``n x out/n x rank`` and ``t``: ``n x rank x in/n``), else the full ``b`` (``n x out/n x in/n``).
    """

    def __init__(self, in_features: int, out_features: int, n: int, rank: int | None, *, zero: bool = False,
                 device=None, dtype=None) -> None:
        super().__init__()
        if in_features % n or out_features % n:
            raise ValueError(f"PHM layer {in_features} -> {out_features} needs both sizes divisible by n={n}")
        p, q = out_features // n, in_features // n
        kw = {"device": device, "dtype": dtype}
        bound = 1.0 / math.sqrt(in_features)  # nn.Linear's fan-in bound, for W given A ~ N(0, 1/n)
        if rank is None:
            self.b = nn.Parameter(torch.empty(n, p, q, **kw).uniform_(-bound, bound))
        else:
            self.s = nn.Parameter(torch.randn(n, p, rank, **kw) / math.sqrt(rank))
            self.t = nn.Parameter(torch.empty(n, rank, q, **kw).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.zeros(out_features, **kw))
        self.rank = rank
        if zero:  # W = 0: an up projection that starts the adapter as the identity
            with torch.no_grad():
                (self.b if rank is None else self.s).zero_()

    def fast_weights(self) -> torch.Tensor:
        """The ``B_i`` stacked: ``n x out/n x in/n``."""
        return self.b if self.rank is None else self.s @ self.t

    def weight(self, rule: torch.Tensor) -> torch.Tensor:
        """The full ``out x in`` weight for slow weights ``rule``."""
        return kronecker_sum(rule, self.fast_weights())

    def forward(self, x: torch.Tensor, rule: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight(rule), self.bias)


class PHMBottleneck(nn.Module):
    """``up(act(down(x)))`` with PHM projections sharing the slow weights ``rule``."""

    def __init__(self, in_features: int, width: int, out_features: int, n: int, rank: int | None,
                 activation: str, *, device=None, dtype=None) -> None:
        super().__init__()
        self.down = PHMLinear(in_features, width, n, rank, device=device, dtype=dtype)
        self.activation = make_activation(activation)
        self.up = PHMLinear(width, out_features, n, rank, zero=True, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor, rule: torch.Tensor) -> torch.Tensor:
        return self.up(self.activation(self.down(x, rule)), rule)


def init_rule(n: int, *, device=None) -> torch.Tensor:
    """Slow weights ``A`` ~ N(0, 1/n): then ``W`` has the variance of ``B``."""
    return torch.randn(n, n, n, device=device) / math.sqrt(n)
