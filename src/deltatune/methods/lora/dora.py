"""DoRA: weight-decomposed low-rank adaptation (Liu et al. 2024), on top of a LoRA layer.

The adapted weight is ``m * (W + s B A) / ||W + s B A||``: a learned magnitude ``m`` (one value per
output feature, per embedding dimension for embeddings) times the direction of the LoRA-updated
weight. As in the paper (section 4.3) and in peft, the norm is treated as a constant in the
backward pass, so the layer's output is

    base(x) + (c - 1) * (x W^T) + c * s * (x A^T B^T),    c = m / ||W + s B A||  (detached)

which needs the base output once and no full-size weight in the graph. The magnitude is stored
as ``lora_magnitude_vector`` (peft's file key), so files move both ways.

Merging is not additive: it rescales the weight, ``W' = c * (W + s B A)``, and unmerging divides
by the same ``c``, kept from the merge (the norm of the merged weight is a different number).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from deltatune.core.quantized import handler_for


def dense_base_weight(base: nn.Module) -> torch.Tensor:
    """The base layer's weight as a float tensor in its stored layout (dequantized for k-bit layers)."""
    handler = handler_for(base)
    return handler.dequantize(base).weight if handler is not None else base.weight


def weight_out_in(layer, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(W, s B A)`` of adapter ``name``, both ``[out, in]`` in the adapter's dtype; "out" is the
    axis the magnitude runs along (an embedding's dimension, a linear layer's output)."""
    weight = dense_base_weight(layer.base_layer)
    a, b = layer.lora_factors(name)
    weight = weight.t() if layer.stored_transposed else weight
    return weight.to(a.dtype), (b @ a) * layer.scaling[name]


def column_scale(layer, name: str) -> torch.Tensor:
    """``c = m / ||W + s B A||`` per output feature, the norm detached (no gradient through it)."""
    base, update = weight_out_in(layer, name)
    with torch.no_grad():
        norm = torch.linalg.vector_norm(base + update.detach(), dim=1)
    return layer.lora_magnitude_vector[name] / norm


def initial_magnitude(layer, name: str) -> torch.Tensor:
    """``||W + s B A||`` per output feature: DoRA starts where its LoRA factors start."""
    base, update = weight_out_in(layer, name)
    with torch.no_grad():
        return torch.linalg.vector_norm(base + update, dim=1)


def dora_delta(layer, name: str, base_out: torch.Tensor, lora_out: torch.Tensor) -> torch.Tensor:
    """What adapter ``name`` adds to the base output: ``(c - 1) * base_out + c * s * lora_out``, where
    ``base_out`` is the bias-free base output and ``lora_out`` the unscaled ``x A^T B^T``."""
    c = column_scale(layer, name)
    return (c - 1) * base_out.to(c.dtype) + (c * layer.scaling[name]) * lora_out


def sole_adapter_output(layer, name: str, result: torch.Tensor, xa: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The layer's whole output when DoRA adapter ``name`` is its only one and its input is the
    base layer's: ``bias + c * (x W^T + s (x A^T) B^T)``, the same function as
    ``result + dora_delta`` in three activation-sized passes instead of five. ``result`` is the
    base layer's output (bias included), ``xa`` is ``x A^T``."""
    c = column_scale(layer, name)
    bias = layer.base_layer.bias
    flat = result.reshape(-1, result.shape[-1]).to(c.dtype)
    if bias is not None:
        flat = flat - bias.to(c.dtype)
    flat = torch.addmm(flat, xa.reshape(-1, xa.shape[-1]).to(c.dtype), b.t(), alpha=layer.scaling[name])
    out = torch.addcmul(bias.to(c.dtype), flat, c) if bias is not None else flat * c
    return out.view(result.shape).to(result.dtype)


def _stored(layer, weight_oi: torch.Tensor) -> torch.Tensor:
    return weight_oi.t() if layer.stored_transposed else weight_oi


def merged_weight(layer, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(c * (W + s B A), c)`` in the base weight's layout: the weight with ``name`` merged in."""
    base, update = weight_out_in(layer, name)
    with torch.no_grad():
        c = layer.lora_magnitude_vector[name] / torch.linalg.vector_norm(base + update, dim=1)
        return _stored(layer, c[:, None] * (base + update)), c


def unmerged_weight(layer, name: str, merged: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """The weight before ``name`` was merged: ``W' / c - s B A``, in the stored layout."""
    _, update = weight_out_in(layer, name)
    with torch.no_grad():
        oi = merged.t() if layer.stored_transposed else merged
        return _stored(layer, oi.to(c.dtype) / c[:, None] - update)


def linear_base_out(layer, x: torch.Tensor) -> torch.Tensor:
    """``x W^T`` without the bias (for a dropped-out input that the base layer did not see)."""
    weight = dense_base_weight(layer.base_layer)
    return F.linear(x.to(weight.dtype), weight.t() if layer.stored_transposed else weight)
