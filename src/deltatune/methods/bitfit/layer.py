"""The BitFit wrapper: a per-adapter delta added to a module's bias, the base bias untouched."""

from __future__ import annotations

import torch
from torch import nn

from deltatune.core.layer import AdapterLayer, adapter_dtype, linear_kinds
from deltatune.errors import TargetError


def bitfit_kinds() -> tuple[type, ...]:
    """Modules whose bias is added along the last dimension of the output, which BitFit wraps."""
    return (*linear_kinds(), nn.LayerNorm)


class BitFitLayer(AdapterLayer):
    """``y = f(x) + delta``: the wrapped module's output plus a trained change to its bias.

    Merging adds the delta to ``base_layer.bias``; the delta is what a file stores (``bias_delta``).
    """

    adapter_attrs = ("bias_delta",)
    mergeable = True

    def __init__(self, base_layer: nn.Module) -> None:
        if getattr(base_layer, "bias", None) is None:
            raise TargetError(f"a {type(base_layer).__name__} without a bias cannot take a BitFit adapter")
        super().__init__(base_layer)
        self.bias_delta = nn.ParameterDict()

    def add_adapter(self, name: str) -> None:
        bias = self.base_layer.bias
        self.bias_delta[name] = nn.Parameter(torch.zeros(bias.shape, dtype=adapter_dtype(bias), device=bias.device))

    def adapted_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        for name in self.unmerged_active():
            result = result + self.bias_delta[name].to(result.dtype)
        return result

    def _base_weight(self) -> torch.Tensor:
        return self.base_layer.bias

    def delta_weight(self, name: str) -> torch.Tensor:
        """The change to ``base_layer.bias`` (the one tensor BitFit merges into)."""
        return self.bias_delta[name]
