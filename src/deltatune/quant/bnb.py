"""bitsandbytes 4-bit (NF4/FP4, optional double quantization) and 8-bit (LLM.int8) linear layers."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch
from torch import nn

from deltatune.core.archspec import head_names
from deltatune.core.quantized import QuantHandler, handler_for, register_quantized
from deltatune.errors import ConfigError, DeltatuneError


def _bnb():
    try:
        import bitsandbytes
    except ImportError:
        raise DeltatuneError("k-bit quantization needs bitsandbytes: pip install 'deltatune[quant]'") from None
    return bitsandbytes


def _quantize_4bit(dense: nn.Linear, compute_dtype: torch.dtype, quant_type: str, double_quant: bool) -> nn.Module:
    bnb = _bnb()
    layer = bnb.nn.Linear4bit(dense.in_features, dense.out_features, bias=dense.bias is not None,
                              compute_dtype=compute_dtype, compress_statistics=double_quant, quant_type=quant_type)
    layer.weight = bnb.nn.Params4bit(dense.weight.data.detach().to("cpu", torch.float32), requires_grad=False,
                                     quant_type=quant_type, compress_statistics=double_quant)
    if dense.bias is not None:
        layer.bias = nn.Parameter(dense.bias.data.detach().clone(), requires_grad=False)
    return layer.to(dense.weight.device)  # bitsandbytes quantizes on the move to a device


def _quantize_8bit(dense: nn.Linear, threshold: float = 6.0) -> nn.Module:
    bnb = _bnb()
    layer = bnb.nn.Linear8bitLt(dense.in_features, dense.out_features, bias=dense.bias is not None,
                                has_fp16_weights=False, threshold=threshold)
    layer.weight = bnb.nn.Int8Params(dense.weight.data.detach().to("cpu", torch.float32).contiguous(),
                                     requires_grad=False, has_fp16_weights=False)
    if dense.bias is not None:
        layer.bias = nn.Parameter(dense.bias.data.detach().clone(), requires_grad=False)
    return layer.to(dense.weight.device)


def _dense_like(module: nn.Module, weight: torch.Tensor) -> nn.Linear:
    dense = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None,
                      device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        dense.weight.copy_(weight)
        if module.bias is not None:
            dense.bias.copy_(module.bias.to(weight.dtype))
    return dense


def _dequantize_4bit(module: nn.Module) -> nn.Linear:
    weight = _bnb().functional.dequantize_4bit(module.weight.data, module.weight.quant_state)
    return _dense_like(module, weight.to(torch.float32))


def _row_scales(module: nn.Module) -> torch.Tensor:
    # bitsandbytes keeps the per-row scales on the weight until the first forward, then on .state
    scales = getattr(module.weight, "SCB", None)
    return scales if scales is not None else module.state.SCB


def _dequantize_8bit(module: nn.Module) -> nn.Linear:
    weight = module.weight.data.float() * _row_scales(module).float()[:, None] / 127.0
    return _dense_like(module, weight)


def _bits_4bit(module: nn.Module) -> float:
    state = module.weight.quant_state
    total = module.weight.data.numel() * module.weight.data.element_size() * 8
    total += state.absmax.numel() * state.absmax.element_size() * 8
    if state.nested:
        total += state.state2.absmax.numel() * state.state2.absmax.element_size() * 8 + 32  # + the offset
    return total


def _bits_8bit(module: nn.Module) -> float:
    scales = _row_scales(module)
    return module.weight.data.numel() * 8 + scales.numel() * scales.element_size() * 8


def register_bnb_handlers() -> None:
    """Tell the core how to merge into (and measure) bitsandbytes layers."""
    register_quantized("Linear4bit", QuantHandler(
        dequantize=_dequantize_4bit,
        requantize=lambda dense, old: _quantize_4bit(dense, old.compute_dtype or torch.float32,
                                                     old.weight.quant_type, old.weight.compress_statistics),
        bits=_bits_4bit))
    register_quantized("Linear8bitLt", QuantHandler(
        dequantize=_dequantize_8bit,
        requantize=lambda dense, old: _quantize_8bit(dense, old.state.threshold),
        bits=_bits_8bit))


def _skipped(model: nn.Module, skip: Iterable[str] | None) -> set[str]:
    return head_names(model) | set(skip or ())


def quantize(model: nn.Module, bits: int = 4, *, quant_type: str = "nf4", double_quant: bool = True,
             compute_dtype: torch.dtype | None = None, skip: Iterable[str] | None = None) -> nn.Module:
    """Replace the model's ``nn.Linear`` layers, in place, with bitsandbytes k-bit layers.

    ``bits=4`` gives 4-bit NormalFloat with double quantization (QLoRA's storage format);
    ``bits=8`` gives LLM.int8 layers. The output head and classification heads stay in full
    precision, as ``transformers`` does; add names (suffixes) to ``skip`` to keep more.
    ``compute_dtype`` defaults to the layer's own dtype (fp32 here; bf16 where you ask for it).
    """
    if bits not in (4, 8):
        raise ConfigError(f"bits must be 4 or 8, got {bits!r}")
    if quant_type not in ("nf4", "fp4"):
        raise ConfigError(f"quant_type must be 'nf4' or 'fp4', got {quant_type!r}")
    keep = _skipped(model, skip)
    targets = [(name, module) for name, module in model.named_modules()
               if type(module) is nn.Linear and not any(name == k or name.endswith("." + k) for k in keep)]
    if not targets:
        raise ConfigError("the model has no nn.Linear layers to quantize")
    for name, module in targets:
        new = (_quantize_4bit(module, compute_dtype or module.weight.dtype, quant_type, double_quant) if bits == 4
               else _quantize_8bit(module))
        model.set_submodule(name, new)
    return model


@dataclass(frozen=True)
class QuantizationReport:
    """Storage of a model's quantized layers."""

    quantized_params: int
    quantized_bytes: float
    other_params: int
    other_bytes: int

    @property
    def bits_per_quantized_param(self) -> float:
        return 8 * self.quantized_bytes / max(self.quantized_params, 1)

    @property
    def weight_bytes(self) -> float:
        return self.quantized_bytes + self.other_bytes


def quantization_report(model: nn.Module) -> QuantizationReport:
    """Parameters and bytes held in quantized layers vs everything else (weights only)."""
    q_params, q_bits = 0, 0.0
    seen: set[int] = set()
    for module in model.modules():
        handler = handler_for(module)
        if handler is not None:
            q_params += module.in_features * module.out_features
            q_bits += handler.bits(module)
            seen.add(id(module.weight))
    other = [p for p in model.parameters() if id(p) not in seen]
    return QuantizationReport(q_params, q_bits / 8, sum(p.numel() for p in other),
                              sum(p.numel() * p.element_size() for p in other))
