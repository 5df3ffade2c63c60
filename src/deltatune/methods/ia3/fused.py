"""One autograd node for an IA3 linear layer: ``y = ((x * l_in) W^T + bias) * l_out``.

Why: the plain path scales the activations before the layer (a new ``[N, in]`` buffer that
autograd keeps for the backward: on a BERT feed-forward output layer that is the 4x-wide
intermediate) and after it (another ``[N, out]`` node). Here the input scale is folded into
the weight (``W diag(l_in)``, a weight-sized product instead of an activation-sized one), the
saved tensors are only ``x`` (when ``l_in`` trains) and the pre-scale output (when ``l_out``
does), and the backward builds the input gradient with one matmul and in-place scaling.
The frozen W gets no gradient (callers use this path only when W is frozen). Under autocast
the operands are cast once to the autocast dtype; the vectors get gradients in their own dtype.
"""

from __future__ import annotations

import torch

from deltatune.core.layer import compute_dtype


class IA3LinearFunction(torch.autograd.Function):
    """Fused IA3 linear. ``weight`` is ``[out, in]`` (``[in, out]`` with ``transposed``);
    ``in_scale`` is ``[in]`` or None, ``out_scale`` is ``[out]`` or None."""

    @staticmethod
    def forward(ctx, x, weight, bias, in_scale, out_scale, transposed: bool):
        dtype = compute_dtype(x)
        with torch.autocast(x.device.type, enabled=False):
            w = (weight.t() if transposed else weight).to(dtype)  # [out, in]
            w_in = w * in_scale.to(dtype) if in_scale is not None else w
            x2 = x.reshape(-1, x.shape[-1]).to(dtype)
            pre = torch.addmm(bias.to(dtype), x2, w_in.t()) if bias is not None else x2 @ w_in.t()
            out = pre * out_scale.to(dtype) if out_scale is not None else pre
        keep_x = in_scale is not None and ctx.needs_input_grad[3]
        keep_pre = out_scale is not None and ctx.needs_input_grad[4]
        ctx.save_for_backward(x2 if keep_x else None, pre if keep_pre else None, w, in_scale, out_scale)
        ctx.x_shape, ctx.x_dtype = x.shape, x.dtype
        ctx.bias_dtype = bias.dtype if bias is not None else None
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad_out):
        x2, pre, w, in_scale, out_scale = ctx.saved_tensors
        with torch.autocast(grad_out.device.type, enabled=False):
            g = grad_out.reshape(-1, grad_out.shape[-1]).to(w.dtype)
            grad_out_scale = (g * pre).sum(0).to(out_scale.dtype) if pre is not None else None
            g_pre = g * out_scale.to(g.dtype) if out_scale is not None else g  # dL/d(pre)
            grad_bias = g_pre.sum(0).to(ctx.bias_dtype) if ctx.needs_input_grad[2] else None
            grad_x = grad_in_scale = None
            if ctx.needs_input_grad[0] or x2 is not None:
                g_xs = g_pre @ w  # dL/d(x * l_in), [N, in]
                if x2 is not None:
                    grad_in_scale = (g_xs * x2).sum(0).to(in_scale.dtype)
                if ctx.needs_input_grad[0]:
                    grad_x = g_xs.mul_(in_scale.to(g_xs.dtype)) if in_scale is not None else g_xs
                    grad_x = grad_x.view(ctx.x_shape).to(ctx.x_dtype)
        return grad_x, None, grad_bias, grad_in_scale, grad_out_scale, None
