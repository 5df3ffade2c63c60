"""The Fastfood transform: a structured random projection R^d -> R^D in O(D) memory.

Li et al. (2018) and Aghajanyan et al. (2020) train a model in a random d-dimensional subspace
``theta = theta0 + P z``. A dense ``P`` (D x d) is out of the question for D in the millions, so
``P`` is built from Fastfood blocks (Le et al. 2013): for a block size ``n`` (a power of two,
at least d) each block is

    V = H G Pi H B / (sqrt(n) * ||G||_2)

with ``H`` the n x n Walsh-Hadamard matrix (applied in O(n log n) by :func:`fwht`, never
stored), ``B`` a diagonal of random signs, ``Pi`` a random permutation and ``G`` a Gaussian
diagonal. ``z`` is zero-padded to ``n``; ``ceil(D / n)`` independent blocks are stacked and the
output cut to ``D``. The normalisation makes each block nearly norm-preserving, so a step of
``z`` moves every coordinate of ``theta`` by about the same amount whatever ``d`` is.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from deltatune.errors import ConfigError


def next_power_of_two(n: int) -> int:
    """The smallest power of two >= ``n`` (and >= 1)."""
    return 1 << max(0, math.ceil(math.log2(max(n, 1))))


#: the largest dense Hadamard factor :func:`fwht` multiplies by (2^7 = 128)
_MAX_FACTOR_BITS = 7
_DENSE: dict[tuple, torch.Tensor] = {}


def hadamard_matrix(m: int, dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
    """The m x m Sylvester Hadamard matrix (m a power of two; cached)."""
    key = (m, dtype, str(device))
    if key not in _DENSE:
        h = torch.ones(1, 1, dtype=dtype, device=device)
        while h.shape[0] < m:
            h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
        _DENSE[key] = h
    return _DENSE[key]


def fwht(x: torch.Tensor) -> torch.Tensor:
    """Unnormalised fast Walsh-Hadamard transform along the last dimension (a power of two).

    Equals ``x @ H`` with ``H`` the Sylvester-ordered Hadamard matrix
    (``H_1 = [1]``, ``H_2n = [[H_n, H_n], [H_n, -H_n]]``); differentiable. ``H_n`` is the
    Kronecker product of smaller Hadamard matrices (``H_ab = H_a (x) H_b``), so the last
    dimension is viewed as a few axes of at most 128 and each is multiplied by its small dense
    factor: O(n * 128) flops in a few matrix products, far faster than log2(n) passes of
    additions in Python.
    """
    n = x.shape[-1]
    if n & (n - 1):
        raise ConfigError(f"fwht needs a power-of-two length, got {n}")
    bits = n.bit_length() - 1
    if bits == 0:
        return x
    parts = -(-bits // _MAX_FACTOR_BITS)
    factors = [bits // parts + (1 if i < bits % parts else 0) for i in range(parts)]
    lead = x.shape[:-1]
    y = x.reshape(*lead, *[1 << b for b in factors])
    for _ in factors:  # multiply the last axis by its factor, then rotate it to the front
        y = torch.matmul(y, hadamard_matrix(y.shape[-1], y.dtype, y.device)).movedim(-1, len(lead))
    return y.reshape(*lead, n)


class Fastfood(nn.Module):
    """A fixed random map R^d -> R^D made of stacked Fastfood blocks (see the module docstring).

    Memory: three length-``blocks * n`` buffers (signs, permutation, Gaussian), i.e. O(D),
    never a D x d matrix. The buffers are drawn from ``seed``, so the map can be rebuilt from
    ``(d, D, seed)`` alone. ``forward(z)`` is linear in ``z`` and differentiable.
    """

    def __init__(self, d: int, D: int, seed: int = 0, device: torch.device | str | None = None) -> None:
        super().__init__()
        if d < 1 or D < 1:
            raise ConfigError(f"Fastfood needs positive sizes, got d={d}, D={D}")
        self.d, self.D = d, D
        self.n = next_power_of_two(d)
        self.blocks = math.ceil(D / self.n)
        gen = torch.Generator().manual_seed(seed)
        shape = (self.blocks, self.n)
        signs = torch.randint(0, 2, shape, generator=gen, dtype=torch.int8) * 2 - 1
        perm = torch.argsort(torch.rand(shape, generator=gen), dim=1)
        gauss = torch.randn(shape, generator=gen)
        # fold the normalisation into G: V = H (G / (sqrt(n) ||G||)) Pi H B
        gauss = gauss / (math.sqrt(self.n) * gauss.norm(dim=1, keepdim=True))
        self.register_buffer("signs", signs.to(device), persistent=False)
        self.register_buffer("perm", perm.to(device), persistent=False)
        self.register_buffer("gauss", gauss.to(device), persistent=False)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """``P z`` for a vector ``z`` of length ``d``: a vector of length ``D``."""
        if z.shape != (self.d,):
            raise ConfigError(f"Fastfood expects a vector of length {self.d}, got shape {tuple(z.shape)}")
        padded = torch.nn.functional.pad(z, (0, self.n - self.d))  # zeros up to the block size
        x = self.signs.to(z.dtype) * padded          # B   (blocks, n)
        x = fwht(x)                                  # H
        x = torch.gather(x, 1, self.perm)            # Pi
        x = fwht(x * self.gauss.to(z.dtype))         # H G
        return x.reshape(-1)[: self.D]

    def matrix(self) -> torch.Tensor:
        """The explicit D x d matrix (for tests on small sizes only)."""
        eye = torch.eye(self.d, dtype=self.gauss.dtype, device=self.gauss.device)
        return torch.stack([self.forward(eye[i]) for i in range(self.d)], dim=1)

    def extra_repr(self) -> str:
        return f"d={self.d}, D={self.D}, block={self.n}, blocks={self.blocks}"
