"""Compacter configuration (Karimi Mahabadi et al. 2021).

HF PEFT has no Compacter, so files name the method with ``deltatune_method``.
"""

from __future__ import annotations

from dataclasses import dataclass

from deltatune.core.config import positive_int
from deltatune.errors import ConfigError
from deltatune.methods.adapters.config import BottleneckConfig


@dataclass(frozen=True)
class CompacterConfig(BottleneckConfig):
    """Bottleneck adapters whose projections are PHM layers: sums of Kronecker products.

    Each projection ``W`` (``out x in``) is ``sum_i A_i kron B_i`` for ``i = 1..n``, with
    ``A_i`` (``n x n``) the *slow* weights, one tensor ``A`` (``n x n x n``) shared by every
    projection of the adapter in every layer, and ``B_i`` (``out/n x in/n``) the *fast* weights,
    per projection. With ``phm_rank = r`` each ``B_i = s_i t_i`` is low-rank (``s_i``:
    ``out/n x r``, ``t_i``: ``r x in/n``): that is Compacter; ``phm_rank=None`` keeps ``B_i``
    full (the paper's PHM-Adapter). Placement as bottleneck adapters: ``style="pfeiffer"``
    (after the FFN only) is Compacter++, ``"houlsby"`` is Compacter.

    Parameter count, for ``P`` wrapped modules of hidden size ``d`` and bottleneck ``k``
    (each adapter: a PHM down projection ``d -> k`` and a PHM up projection ``k -> d``, each
    with a bias)::

        n^3 + P * (2 r (d + k) + d + k)        with phm_rank = r
        n^3 + P * (2 d k / n + d + k)          with phm_rank = None

    ``n^3`` is counted once however many layers share ``A``. Without the biases this is the
    paper's ``n^3 + 4 L r (k + d)`` for Houlsby placement (``P = 2 L`` for ``L`` blocks).

    Attributes:
        phm_dim: ``n``, the number of Kronecker summands; must divide ``d`` and ``k``.
        phm_rank: rank ``r`` of the fast weights, or ``None`` for full fast weights.

    (Placement and width: see :class:`~deltatune.methods.adapters.config.BottleneckConfig`;
    Compacter's defaults are Compacter++'s: Pfeiffer placement, reduction factor 32, GELU.)
    """

    method = "compacter"

    reduction_factor: int | float = 32
    activation: str = "gelu"
    phm_dim: int = 4
    phm_rank: int | None = 1

    def validate(self) -> None:
        super().validate()
        positive_int("phm_dim", self.phm_dim)
        positive_int("phm_rank", self.phm_rank, none="full-rank fast weights")
        if self.bottleneck is not None and self.bottleneck % self.phm_dim:
            raise ConfigError(f"bottleneck {self.bottleneck} is not divisible by phm_dim {self.phm_dim}; "
                              f"pick a multiple of {self.phm_dim}")
