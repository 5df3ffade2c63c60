"""LoRA on fused MoE expert weights: the 3-D parameters ``[experts, out, in]`` that transformers 5
keeps for Mixtral, Qwen3-MoE, OLMoE and DeepSeek's routed experts, in peft's
``target_parameters`` layout.

Each targeted parameter gets, per adapter, ``A: [r * experts, in]`` and ``B: [out, r * experts]``;
expert ``e`` uses rows ``e*r .. e*r+r-1`` of A and the columns ``j*experts + e`` of B (peft's
order), so its update is ``scaling * B_e @ A_e``. The wrapper runs the experts module with the
updated weights (``torch.func.functional_call``): the module's own forward, no copy of its code.
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from deltatune.core.layer import adapter_dtype
from deltatune.errors import AdapterError, ConfigError
from deltatune.methods.lora.factors import init_factors
from deltatune.methods.lora.layer import LoraLayer


class LoraExperts(LoraLayer):
    """LoRA on some 3-D parameters of one experts module (``param_names``, in its own order)."""

    adapter_attrs = ("lora_A", "lora_B")
    adapts_parameters = True
    mixes_rows = False  # the experts module sees routed tokens, not the batch's rows

    def __init__(self, base_layer: nn.Module, param_names: Iterable[str]) -> None:
        super().__init__(base_layer)
        wanted = set(param_names)
        # peft nests one wrapper per parameter in the module's own order: keep that order for the file keys
        self.param_names = [n for n, _ in base_layer.named_parameters(recurse=False) if n in wanted]
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()

    def _layout(self, param_name: str) -> tuple[int, int, int, bool]:
        """``(experts, out, in, transposed)``: most models store ``[experts, out, in]``; those
        that set ``is_transposed`` store ``[experts, in, out]``."""
        experts, first, second = getattr(self.base_layer, param_name).shape
        transposed = bool(getattr(self.base_layer, "is_transposed", False))
        return (experts, second, first, True) if transposed else (experts, first, second, False)

    def add_adapter(self, name: str, r: int, alpha: float, dropout: float = 0.0,
                    init: str = "kaiming", use_rslora: bool = False) -> None:
        if dropout:
            raise ConfigError("LoRA on fused expert parameters takes no dropout (the input of one expert "
                              "cannot be split from the others'); set dropout=0")
        self._set_hparams(name, r, alpha, 0.0, use_rslora)
        factors_a, factors_b = nn.ParameterDict(), nn.ParameterDict()
        for param_name in self.param_names:
            weight = getattr(self.base_layer, param_name)
            experts, out, inp, _ = self._layout(param_name)
            kw = {"device": weight.device, "dtype": adapter_dtype(weight)}
            a = nn.Parameter(torch.empty(r * experts, inp, **kw))
            b = nn.Parameter(torch.empty(out, r * experts, **kw))
            init_factors(a, b, r, init)
            factors_a[param_name], factors_b[param_name] = a, b
        self.lora_A[name], self.lora_B[name] = factors_a, factors_b

    # --- the factor interface: one pair per expert and parameter, so only rescale applies ----
    def _factor_parameters(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        raise AdapterError("LoRA on fused expert weights keeps one factor pair per expert and parameter, not one "
                           "(A, B) pair: its factors and delta_weight are defined for Linear, Conv1D, Embedding and "
                           "Conv2d LoRA layers only")

    def rescale(self, name: str, factor: float) -> None:
        with torch.no_grad():
            for b in self.lora_B[name].values():
                b.mul_(factor)

    def parameter_delta(self, name: str, param_name: str) -> torch.Tensor:
        """The change adapter ``name`` makes to the parameter, in the parameter's layout."""
        experts, out, inp, transposed = self._layout(param_name)
        r = self.r[name]
        a = self.lora_A[name][param_name].reshape(experts, r, inp)
        b = self.lora_B[name][param_name].reshape(out, r, experts).permute(2, 0, 1)
        delta = torch.bmm(b, a) * self.scaling[name]
        return delta.transpose(1, 2) if transposed else delta

    def adapted_forward(self, *args, **kwargs):
        names = self.unmerged_active()
        if not names:
            return self.base_layer(*args, **kwargs)
        weights = {}
        for param_name in self.param_names:
            weight = getattr(self.base_layer, param_name)
            weights[param_name] = weight + sum(self.parameter_delta(n, param_name).to(weight.dtype) for n in names)
        return torch.func.functional_call(self.base_layer, weights, args, kwargs)

    # --- file state: peft's nested wrappers, the first parameter innermost ---------------------
    def adapter_state(self, name: str) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for depth, param_name in enumerate(reversed(self.param_names)):
            prefix = "base_layer." * depth
            out[f"{prefix}lora_A.weight"] = self.lora_A[name][param_name]
            out[f"{prefix}lora_B.weight"] = self.lora_B[name][param_name]
        return out

    def _without_base_copies(self, tensors: dict[str, torch.Tensor], where: str) -> dict[str, torch.Tensor]:
        return tensors  # "base_layer." here names the inner parameter's factors, not a base copy

    # --- merge: the base's loop, over every adapted parameter ----------------------------------
    def _base_weight(self) -> torch.Tensor:
        # what the merge checks read (floating point, not merged twice): the first adapted parameter
        return getattr(self.base_layer, self.param_names[0])

    def _merge_into(self, weight: torch.Tensor, name: str) -> None:
        for param_name in self.param_names:
            param = getattr(self.base_layer, param_name)
            param.data += self.parameter_delta(name, param_name).to(param.dtype)

    def _unmerge_from(self, weight: torch.Tensor, name: str) -> None:
        for param_name in self.param_names:
            param = getattr(self.base_layer, param_name)
            param.data -= self.parameter_delta(name, param_name).to(param.dtype)
