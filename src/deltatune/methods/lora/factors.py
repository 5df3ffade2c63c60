"""LoRA's factors: the modules that hold them, how they start, and the layout every layer kind
shows them in (:class:`LoraFactors`), which merging, combination and hot swap are built on."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from deltatune.core.layer import needs_initial_values


@dataclass(frozen=True)
class LoraFactors:
    """An adapter's update ``scale * b @ a`` in a layout every LoRA layer kind shares: ``a`` is
    ``[r, fan_in]`` and ``b`` is ``[out, r]`` (a conv's kernels flattened to matrices, an
    embedding's lookup table as ``a``, GPT-2 Conv1D's factors as for ``nn.Linear``)."""

    a: torch.Tensor
    b: torch.Tensor
    scale: float

    @property
    def rank(self) -> int:
        return self.a.shape[0]


def as_matrix(factor: torch.Tensor) -> torch.Tensor:
    """A stored factor as a matrix with its first axis kept (a conv's ``[r, in, kh, kw]`` -> ``[r, in*kh*kw]``)."""
    return factor.reshape(factor.shape[0], -1)


class FactorLinear(nn.Linear):
    """A LoRA factor: an ``nn.Linear`` without bias whose weights the caller initialises (once).

    Built without ``nn.Linear.__init__``, which costs twice as much as the module itself and
    dominated adapter loading (two factors per adapted layer, filled from the file right after).
    It is an ``nn.Linear`` in every other respect (``forward``, ``state_dict``, ``repr``).
    """

    def __init__(self, in_features: int, out_features: int, *, device: torch.device, dtype: torch.dtype) -> None:
        nn.Module.__init__(self)
        # straight into the module's dicts: nn.Module.__setattr__'s type dispatch was a third of
        # this constructor's cost, and the names and types here are fixed
        self.__dict__["in_features"], self.__dict__["out_features"] = in_features, out_features
        self._parameters["weight"] = nn.Parameter(torch.empty(out_features, in_features, device=device, dtype=dtype))
        self._parameters["bias"] = None

    def reset_parameters(self) -> None:
        pass


def _fan_in_uniform_(weight: torch.Tensor) -> None:
    # nn.Linear's default (Kaiming-uniform with a=sqrt(5)) is U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    bound = 1.0 / math.sqrt(weight[0].numel())
    with torch.no_grad():
        weight.uniform_(-bound, bound)


def init_factors(a: torch.Tensor, b: torch.Tensor, r: int, init: str) -> None:
    """A Kaiming-uniform (or N(0, 1/r) for "gaussian"); B zero, or random for "random".
    Nothing to do when a file is about to fill them (:func:`deltatune.core.layer.weights_from_file`)."""
    if not needs_initial_values():
        return
    with torch.no_grad():
        if init == "gaussian":
            a.normal_(std=1.0 / r)
        else:
            _fan_in_uniform_(a)
        if init == "random":
            _fan_in_uniform_(b)
        else:
            b.zero_()
