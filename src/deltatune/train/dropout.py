"""Dropout for training on a CPU, with masks drawn by NumPy's SFC64 generator.

torch draws a CPU dropout mask one number at a time from a single Mersenne Twister: about 15 ns
an element on a 2-core Xeon, a sixth of a MiniLM LoRA step. SFC64 fills the same mask with 32
random bits an element in under 1 ns. The function is dropout's: each element is kept with
probability ``1 - p`` (to 2**-32) and scaled by ``1 / (1 - p)``; only the random stream differs.
Each mask's generator is seeded from torch's own generator, so ``torch.manual_seed`` fixes the
masks and a checkpoint's saved torch RNG state resumes them.

:func:`fast_dropout` swaps it in for a model's :func:`plain_dropouts` for the duration of a
training step; packed attention (:mod:`deltatune.train.packing`) uses :func:`dropout` for the
attention probabilities.
"""

from __future__ import annotations

import contextlib
from typing import Iterable, Iterator

import numpy as np
import torch
from torch import nn

_BITS = 2.0 ** 32


def _random_bits(count: int) -> np.ndarray:
    """``count`` uniform 32-bit numbers from an SFC64 generator seeded by torch's generator."""
    seed = int(torch.randint(0, 2 ** 62, (), dtype=torch.int64))
    return np.random.SFC64(seed).random_raw((count + 1) // 2).view(np.uint32)[:count]  # 2 per 64 bits


def _threshold(p: float) -> np.uint32:
    return np.uint32(min(round(p * _BITS), _BITS - 1))


def keep_mask(shape: torch.Size | tuple[int, ...], p: float) -> torch.Tensor:
    """A boolean CPU tensor of ``shape``, each element True with probability ``1 - p``."""
    count = int(np.prod(shape, dtype=np.int64))
    return torch.from_numpy(_random_bits(count) >= _threshold(p)).view(shape)


def dropout(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """``torch.nn.functional.dropout(x, p, training)``, with the mask drawn as in :func:`keep_mask`
    when ``x`` is a float32 CPU tensor (otherwise torch's own dropout: fast on accelerators)."""
    if not training or p == 0.0:
        return x
    if x.device.type != "cpu" or x.dtype != torch.float32 or not 0.0 < p < 1.0:
        return torch.nn.functional.dropout(x, p, training)
    keep = _random_bits(x.numel()) >= _threshold(p)
    # the kept elements' factor, 1 / (1 - p), built by NumPy in one pass: torch's bool-to-float
    # conversion of the mask cost more than drawing it
    factor = np.multiply(keep, np.float32(1.0 / (1.0 - p)), dtype=np.float32)
    return x * torch.from_numpy(factor).view(x.shape)


def _forward(module: nn.Dropout, x: torch.Tensor) -> torch.Tensor:
    return dropout(x, module.p, module.training)


def plain_dropouts(model: nn.Module) -> list[nn.Dropout]:
    """The ``nn.Dropout`` modules of ``model`` that drop something: plain ones only (a subclass
    may do more than dropout), not in-place."""
    return [m for m in model.modules() if type(m) is nn.Dropout and m.p > 0 and not m.inplace]


@contextlib.contextmanager
def fast_dropout(modules: Iterable[nn.Dropout]) -> Iterator[None]:
    """Within: ``modules`` (see :func:`plain_dropouts`) draw their masks with :func:`dropout`."""
    swapped = list(modules)
    for module in swapped:
        module.forward = _forward.__get__(module)
    try:
        yield
    finally:
        for module in swapped:
            del module.forward
