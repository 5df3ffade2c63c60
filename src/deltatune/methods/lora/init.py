"""Data-driven LoRA initialisations: PiSSA (Meng et al. 2024) and OLoRA (Büyükakyüz 2024).

Both start the factors on a rank-r part of the base weight ``W`` (``[out, in]``) instead of at
zero, and leave the rest, the *residual* ``W - s B0 A0``, frozen:

- ``pissa``: the top-r singular triplets, ``B0 = U_r sqrt(S_r / s)``, ``A0 = sqrt(S_r / s) V_r^T``;
  ``pissa_niter_K`` uses a randomized SVD with K subspace iterations (fast on large layers).
- ``olora``: the first r columns/rows of a QR decomposition, ``B0 = Q_r``, ``A0 = R_r``.

deltatune does not edit the user's weights: the layer keeps ``W`` and its frozen initial factors
and applies ``W + s (B A - B0 A0)``, the same function as peft's residual base plus ``s B A``.
So ``disabled()`` is the original model, and the adapter is exactly the rank-2r LoRA
``A' = [A; A0]``, ``B' = [B, -B0]`` on the original weights, which is what files store (peft's
conversion of PiSSA/OLoRA into a plain LoRA), so they load anywhere.
"""

from __future__ import annotations

import math
import re

import torch
from torch import nn

DATA_INITS = ("pissa", "olora")
_NITER = re.compile(r"pissa_niter_(\d+)")


def is_data_init(init: str) -> bool:
    """Whether ``init`` starts the factors from the base weight (PiSSA, its fast variant, OLoRA)."""
    return init in DATA_INITS or _NITER.fullmatch(init) is not None


def is_reproducible(init: str) -> bool:
    """False for the randomized SVD: its factors cannot be rebuilt from the base weight later."""
    return _NITER.fullmatch(init) is None


def initial_factors(weight_oi: torch.Tensor, r: int, scale: float, init: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A0, B0)`` of shapes ``[r, in]``, ``[out, r]`` for ``init`` on the ``[out, in]`` weight
    (``r <= min(out, in)``, which the LoRA injector checks before wrapping anything)."""
    w = weight_oi.detach().float()
    if init == "olora":
        q, rr = torch.linalg.qr(w)
        return rr[:r].contiguous(), q[:, :r].contiguous()
    niter = _NITER.fullmatch(init)
    if niter is None:
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        u, s, vh = u[:, :r], s[:r], vh[:r]
    else:
        u, s, v = torch.svd_lowrank(w, q=r, niter=int(niter.group(1)))
        vh = v.t()
    root = (s / scale).sqrt()
    return (root[:, None] * vh).contiguous(), (u * root).contiguous()


class InitialFactors(nn.Module):
    """The frozen ``A0``, ``B0`` of one adapter: buffers (they move with the model) that are not
    saved in state dicts (files store the converted adapter instead)."""

    def __init__(self, a: torch.Tensor, b: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("a", a, persistent=False)
        self.register_buffer("b", b, persistent=False)


def converted_file_fields(config) -> dict:
    """The adapter_config.json fields of the rank-2r plain LoRA a PiSSA/OLoRA adapter is saved as:
    double ranks, and alphas that keep each module's scale."""
    alpha_factor = math.sqrt(2) if config.use_rslora else 2
    return {"r": 2 * config.r, "lora_alpha": alpha_factor * config.alpha, "init_lora_weights": True,
            "rank_pattern": {k: 2 * v for k, v in config.rank_pattern.items()},
            "alpha_pattern": {k: alpha_factor * v for k, v in config.alpha_pattern.items()}}
