"""One autograd node for a LoRA linear layer: ``y = x W^T + bias + s (x A^T) B^T``.

Why: the plain path builds five autograd nodes and materialises the update, its scaled copy
and the sum; the backward then adds two input gradients. Here the forward writes base and LoRA
outputs into one buffer (``addmm_``), saves only ``x`` and the small ``x A^T``, and the backward
accumulates the input gradient in place. The frozen W gets no gradient (callers use this path
only when W is frozen); a trainable bias does. Under autocast every
operand is cast once to the autocast dtype (no fp32 copies are kept); A and B get their
gradients in their own dtype.
"""

from __future__ import annotations

import torch

from deltatune.core.layer import compute_dtype


class LoraLinearFunction(torch.autograd.Function):
    """Fused LoRA linear. ``weight`` is ``[out, in]`` (or ``[in, out]`` with ``transposed``)."""

    @staticmethod
    def forward(ctx, x, weight, bias, a, b, scale: float, transposed: bool):
        dtype = compute_dtype(x)
        with torch.autocast(x.device.type, enabled=False):
            x2 = x.reshape(-1, x.shape[-1]).to(dtype)
            w = weight.to(dtype)
            w_t = w if transposed else w.t()
            a_, b_ = a.to(dtype), b.to(dtype)
            xa = x2 @ a_.t()
            out = torch.addmm(bias.to(dtype), x2, w_t) if bias is not None else x2 @ w_t
            out.addmm_(xa, b_.t(), alpha=scale)
        ctx.save_for_backward(x2, xa, w, a_, b_)
        ctx.scale, ctx.transposed = scale, transposed
        ctx.x_dtype, ctx.a_dtype, ctx.b_dtype = x.dtype, a.dtype, b.dtype
        ctx.bias_dtype = bias.dtype if bias is not None else None
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad_out):
        x2, xa, w, a, b = ctx.saved_tensors
        with torch.autocast(grad_out.device.type, enabled=False):
            g = grad_out.reshape(-1, grad_out.shape[-1]).to(xa.dtype)
            gb = (g @ b).mul_(ctx.scale)  # dL/d(xA^T), [N, r]
            grad_x = None
            if ctx.needs_input_grad[0]:
                grad_x = g @ (w.t() if ctx.transposed else w)
                grad_x.addmm_(gb, a)
                grad_x = grad_x.view(*grad_out.shape[:-1], x2.shape[-1]).to(ctx.x_dtype)
            grad_a = (gb.t() @ x2).to(ctx.a_dtype) if ctx.needs_input_grad[3] else None
            grad_b = (g.t() @ xa).mul_(ctx.scale).to(ctx.b_dtype) if ctx.needs_input_grad[4] else None
            grad_bias = g.sum(0).to(ctx.bias_dtype) if ctx.needs_input_grad[2] else None
        return grad_x, None, grad_bias, grad_a, grad_b, None, None
