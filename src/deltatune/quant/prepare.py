"""Getting a k-bit model ready for adapter training (what users know as prepare_model_for_kbit_training)."""

from __future__ import annotations

import torch
from torch import nn

from deltatune.core.quantized import is_quantized


def prepare_for_kbit_training(model: nn.Module, gradient_checkpointing: bool = True) -> nn.Module:
    """Freeze every weight, keep half-precision norms/embeddings/head in fp32 for stable training,
    let gradients reach the inputs (needed with checkpointing over a frozen embedding), and turn
    on gradient checkpointing (non-reentrant). Returns the same model."""
    quantized_params = {id(p) for m in model.modules() if is_quantized(m) for p in m.parameters(recurse=False)}
    for param in model.parameters():
        param.requires_grad_(False)
        if id(param) not in quantized_params and param.dtype in (torch.float16, torch.bfloat16):
            param.data = param.data.float()
    if gradient_checkpointing and hasattr(model, "gradient_checkpointing_enable"):
        if hasattr(model, "enable_input_require_grads"):
            model.enable_input_require_grads()
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model
