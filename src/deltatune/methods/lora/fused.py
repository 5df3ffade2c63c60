"""One autograd node for a LoRA linear layer: ``y = x W^T + bias + s (x A^T) B^T``.

Why: the plain path builds five autograd nodes, and the backward autograd derives for them
computes two of the rank-r products in the slow orientation (a ``[in, N] @ [N, r]`` product runs
about 7x slower on one CPU thread than the same numbers as ``[r, N] @ [N, in]``) and adds two
input gradients. Here every rank-r product has the long token axis as the output's wide side,
and only ``x`` and the small ``x A^T`` are saved. With LoRA dropout the rank-r branch reads its
own (dropped-out) input ``x_lora``; autograd's dropout node carries its gradient back to ``x``.

Without dropout, in fp32 (and fp64) the update is folded into the weight, ``W' = W + s B A``
(an ``[out, in]`` product, r/N of the activation-sized work): the forward and the input gradient
are then one matmul each, exactly as for the frozen layer, and no activation-sized buffer is
read or written twice. ``W'`` is rebuilt in the backward rather than kept. In bf16/fp16 the two
terms stay apart: a small update would round away inside a low-precision ``W'``.

The frozen W gets no gradient (callers use this path only when W is frozen); a trainable bias
does. Under autocast every operand is cast once to the autocast dtype (no fp32 copies are kept);
A and B get their gradients in their own dtype.
"""

from __future__ import annotations

import torch

from deltatune.core.layer import compute_dtype

#: compute dtypes in which the update is folded into the weight (see the module docstring)
FOLD_DTYPES = (torch.float32, torch.float64)


def _weight_t(w: torch.Tensor, transposed: bool) -> torch.Tensor:
    """The weight as ``[in, out]`` (a view)."""
    return w if transposed else w.t()


def _merged_weight_t(w: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float, transposed: bool) -> torch.Tensor:
    """``(W + s B A)^T`` as ``[in, out]``, laid out as the frozen weight is (so the matmuls that
    use it run as fast as the frozen layer's own)."""
    if transposed:
        return torch.addmm(w, a.t(), b.t(), alpha=scale)
    return torch.addmm(w, b, a, alpha=scale).t()


#: how a call computes the update (see the module docstring): folded into the weight, as a
#: separate term on the same input, or as a separate term on its own (dropped-out) input
FOLD, SPLIT, OWN_INPUT = "fold", "split", "own-input"


class LoraLinearFunction(torch.autograd.Function):
    """Fused LoRA linear. ``weight`` is ``[out, in]`` (or ``[in, out]`` with ``transposed``);
    ``x_lora`` is the rank-r branch's input when it differs from ``x`` (dropout), else None."""

    @staticmethod
    def forward(ctx, x, x_lora, weight, bias, a, b, scale: float, transposed: bool):
        dtype = compute_dtype(x)
        mode = OWN_INPUT if x_lora is not None else FOLD if dtype in FOLD_DTYPES else SPLIT
        with torch.autocast(x.device.type, enabled=False):
            x2 = x.reshape(-1, x.shape[-1]).to(dtype)
            xl2 = x2 if x_lora is None else x_lora.reshape(x2.shape).to(dtype)
            w, a_, b_ = weight.to(dtype), a.to(dtype), b.to(dtype)
            xa = (a_ @ xl2.t()).t()  # [N, r], computed as [r, N]: the fast orientation
            w_t = _merged_weight_t(w, a_, b_, scale, transposed) if mode == FOLD else _weight_t(w, transposed)
            out = torch.addmm(bias.to(dtype), x2, w_t) if bias is not None else x2 @ w_t
            if mode != FOLD:
                out.addmm_(xa, b_.t(), alpha=scale)
        ctx.save_for_backward(xl2, xa, w, a_, b_)
        ctx.scale, ctx.transposed, ctx.mode = scale, transposed, mode
        ctx.x_dtype, ctx.a_dtype, ctx.b_dtype = x.dtype, a.dtype, b.dtype
        ctx.bias_dtype = bias.dtype if bias is not None else None
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad_out):
        xl2, xa, w, a, b = ctx.saved_tensors
        scale, mode = ctx.scale, ctx.mode
        needs_x, needs_x_lora, needs_a = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[4]
        with torch.autocast(grad_out.device.type, enabled=False):
            g = grad_out.reshape(-1, grad_out.shape[-1]).to(xa.dtype)
            gb_t = None  # dL/d(xA^T) as [r, N], when a gradient below needs it
            if needs_a or (needs_x and mode == SPLIT) or (needs_x_lora and mode == OWN_INPUT):
                gb_t = (b.t() @ g.t()).mul_(scale)
            x_shape = (*grad_out.shape[:-1], xl2.shape[-1])
            grad_x = grad_x_lora = None
            if needs_x:
                if mode == FOLD:
                    grad_x = g @ _merged_weight_t(w, a, b, scale, ctx.transposed).t()
                else:
                    grad_x = g @ _weight_t(w, ctx.transposed).t()
                    if mode == SPLIT:
                        grad_x.addmm_(gb_t.t(), a)
                grad_x = grad_x.view(x_shape).to(ctx.x_dtype)
            if needs_x_lora and mode == OWN_INPUT:
                grad_x_lora = (gb_t.t() @ a).view(x_shape).to(ctx.x_dtype)
            grad_a = (gb_t @ xl2).to(ctx.a_dtype) if needs_a else None
            grad_b = None
            if ctx.needs_input_grad[5]:
                grad_b = (xa.t() @ g).mul_(scale).t().contiguous().to(ctx.b_dtype)
            grad_bias = g.sum(0).to(ctx.bias_dtype) if ctx.needs_input_grad[3] else None
        return grad_x, grad_x_lora, None, grad_bias, grad_a, grad_b, None, None
