"""Which arithmetic to train and serve in: ``auto`` takes bf16 autocast where the hardware does
bf16 natively (CUDA GPUs that support it, CPUs with AVX512-BF16 or AMX) and fp32 elsewhere.
Train and serve both use it, so it lives in the core.

On a CPU without native bf16 the autocast kernels emulate it; a MiniLM step measured 20x slower
than fp32, so ``auto`` never picks it there.
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from typing import Callable

import torch

from deltatune.errors import ConfigError

#: what a recipe's ``train.precision`` and the server's ``--precision`` accept
PRECISIONS = ("auto", "fp32", "bf16")


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX tiles)."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in checks)


def cpu_capability() -> str:
    """A short description of the CPU's vector capability (for summaries and reports)."""
    capability = torch.backends.cpu.get_cpu_capability()
    return f"{capability}, native bf16: {'yes' if cpu_has_native_bf16() else 'no'}"


def resolve(precision: str, device: torch.device) -> str:
    """``fp32`` or ``bf16`` for the recipe's ``precision`` on ``device``."""
    if precision not in PRECISIONS:
        raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "auto":
        if device.type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
        return "bf16" if device.type == "cpu" and cpu_has_native_bf16() else "fp32"
    if precision == "bf16" and device.type == "cpu" and not cpu_has_native_bf16():
        warnings.warn("precision bf16 on a CPU without native bf16 is emulated and much slower than fp32; "
                      "use precision: auto", stacklevel=2)
    return precision


def autocast(precision: str, device: torch.device) -> Callable[[], contextlib.AbstractContextManager]:
    """A factory of the context manager each forward pass runs in."""
    if precision == "bf16":
        return functools.partial(torch.autocast, device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext
