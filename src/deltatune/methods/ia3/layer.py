"""The (IA)^3 wrapper for ``nn.Linear`` and GPT-2 ``Conv1D``.

Each adapter is one vector ``ia3_l`` laid out as HF PEFT lays it out: ``[out, 1]`` when it scales
the layer's output, ``[1, in]`` when it scales the input (feed-forward targets), so files map one
to one. Scaling the output also scales the bias, which merging therefore rescales too.
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from deltatune.core.layer import AdapterLayer, adapter_dtype, linear_kinds, linear_layout
from deltatune.errors import AdapterError
from deltatune.methods.ia3.fused import IA3LinearFunction


class IA3Linear(AdapterLayer):
    """Rescales the output (or the input) of a linear layer by learned per-feature vectors.

    Several active adapters multiply their vectors, as HF PEFT does.
    """

    adapter_attrs = ("ia3_l",)
    mergeable = True

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.fan_in_fan_out, self.in_features, self.out_features = linear_layout(base_layer)
        self.ia3_l = nn.ParameterDict()
        #: adapter name -> whether it scales the input (True) or the output (False)
        self.feedforward: dict[str, bool] = {}

    def add_adapter(self, name: str, feedforward: bool, init: str = "ones") -> None:
        shape = (1, self.in_features) if feedforward else (self.out_features, 1)
        weight = self.base_layer.weight
        kw = {"device": weight.device, "dtype": adapter_dtype(weight)}
        value = torch.ones(shape, **kw) if init == "ones" else torch.randn(shape, **kw)
        self.ia3_l[name] = nn.Parameter(value)
        self.feedforward[name] = feedforward

    def _forget(self, name: str) -> None:
        self.feedforward.pop(name, None)

    #: take the fused single-node path (see fused.py) where it applies; tests compare both paths
    use_fused: bool = True

    def _fusable(self) -> bool:
        base = self.base_layer
        return self.use_fused and type(base) in linear_kinds() and not base.weight.requires_grad

    def adapted_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        live = self.unmerged_active()
        in_scale = _product(self.ia3_l[n].flatten() for n in live if self.feedforward[n])
        out_scale = _product(self.ia3_l[n].flatten() for n in live if not self.feedforward[n])
        if live and not args and not kwargs and self._fusable():
            base = self.base_layer
            return IA3LinearFunction.apply(x, base.weight, base.bias, in_scale, out_scale, self.fan_in_fan_out)
        if in_scale is not None:
            x = (x * in_scale).to(x.dtype)
        result = self.base_layer(x, *args, **kwargs)
        if out_scale is not None:
            result = (result * out_scale).to(result.dtype)
        return result

    # --- merge algebra --------------------------------------------------------------------
    def _weight_scale(self, name: str) -> torch.Tensor:
        """The vector shaped to broadcast against ``base_layer.weight`` in its own layout."""
        scale = self.ia3_l[name]  # [out, 1] or [1, in]: already the nn.Linear [out, in] layout
        return scale.t() if self.fan_in_fan_out else scale

    def _without(self, tensor: torch.Tensor, scale: torch.Tensor, name: str) -> torch.Tensor:
        # A merged adapter has multiplied its scale in already: divide it out again.
        return tensor / scale if name in self.merged_adapters else tensor

    def delta_weight(self, name: str) -> torch.Tensor:
        """``W' (l - 1)``, where ``W'`` is the current weight without this adapter's own factor
        (the base weight when nothing is merged). Adding it applies the scale; subtracting it
        from the merged weight takes the scale out again, so merges stack multiplicatively."""
        scale = self._weight_scale(name)
        return self._without(self._base_weight(), scale, name) * (scale - 1)

    def delta_bias(self, name: str) -> torch.Tensor | None:
        """The change to ``base_layer.bias`` (output scaling scales the bias), or None."""
        bias = getattr(self.base_layer, "bias", None)
        if bias is None or self.feedforward[name]:
            return None
        scale = self.ia3_l[name].flatten()
        return self._without(bias, scale, name) * (scale - 1)

    def _check_mergeable(self, name: str) -> None:
        if bool((self.ia3_l[name] == 0).any()):
            raise AdapterError(f"IA3 adapter {name!r} has a scale of exactly 0; merging would erase those "
                               f"weights for good, so unmerge() could not restore them. Use the adapter unmerged")


def _product(vectors: Iterable[torch.Tensor]) -> torch.Tensor | None:
    out = None
    for v in vectors:
        out = v if out is None else out * v
    return out
