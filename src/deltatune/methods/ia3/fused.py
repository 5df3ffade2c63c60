"""One autograd node for an IA3 linear layer: ``y = ((x * l_in) W^T + bias) * l_out``.

Why: the plain path scales the activations before the layer (a new ``[N, in]`` buffer that
autograd keeps for the backward: on a BERT feed-forward output layer that is the 4x-wide
intermediate) and after it (another ``[N, out]`` node). Here the input scale is folded into
the weight (``W diag(l_in)``, a weight-sized product instead of an activation-sized one), the
saved tensors are only ``x`` (when ``l_in`` trains) and the output (when ``l_out`` does), and
the backward builds the input gradient with one matmul (the input scale folded into the weight
again, its own gradient divided back out of that product). The output scale
is folded into the weight and bias too (``diag(l_out) W``), so an output-scaled layer costs one
matmul forward and one backward, as the frozen layer does; its gradient
``sum_n g * (x W^T + b)`` is then read off the saved output as ``sum_n g * y / l_out``. A scale
with an exact zero (which those divisions cannot undo) takes the unfolded way (the pre-scale
output is kept, the input gradient scaled after its matmul), and so does every call where
looking for that zero is not free (see :func:`_divisible`).
The frozen W gets no gradient (callers use this path only when W is frozen). Under autocast
the operands are cast once to the autocast dtype; the vectors get gradients in their own dtype.
"""

from __future__ import annotations

import torch

from deltatune.core.layer import compute_dtype


def _divisible(scale: torch.Tensor | None, x: torch.Tensor) -> bool:
    """Whether a scale's gradient may be read off a product that already holds the scale, by
    dividing it out: only when it has no exact zero, and only where checking that is free. On
    CUDA reading the answer back waits for the device once per layer, and under
    ``torch.compile`` it splits the graph at every IA3 layer; there the scale is applied to the
    activations instead (one elementwise product more)."""
    return (scale is not None and x.device.type == "cpu" and not torch.compiler.is_compiling()
            and bool((scale != 0).all()))


class IA3LinearFunction(torch.autograd.Function):
    """Fused IA3 linear. ``weight`` is ``[out, in]`` (``[in, out]`` with ``transposed``);
    ``in_scale`` is ``[in]`` or None, ``out_scale`` is ``[out]`` or None."""

    @staticmethod
    def forward(ctx, x, weight, bias, in_scale, out_scale, transposed: bool):
        dtype = compute_dtype(x)
        fold_out = _divisible(out_scale, x)
        with torch.autocast(x.device.type, enabled=False):
            w = (weight.t() if transposed else weight).to(dtype)  # [out, in]
            w_in = w * in_scale.to(dtype) if in_scale is not None else w
            l_out = out_scale.to(dtype) if out_scale is not None else None
            w_eff = w_in * l_out.unsqueeze(1) if fold_out else w_in
            b = bias.to(dtype) if bias is not None else None
            b_eff = b * l_out if fold_out and b is not None else b
            x2 = x.reshape(-1, x.shape[-1]).to(dtype)
            pre = torch.addmm(b_eff, x2, w_eff.t()) if b_eff is not None else x2 @ w_eff.t()
            out = pre * l_out if out_scale is not None and not fold_out else pre
        keep_x = in_scale is not None and ctx.needs_input_grad[3]
        keep_out = out_scale is not None and ctx.needs_input_grad[4]
        ctx.save_for_backward(x2 if keep_x else None, (out if fold_out else pre) if keep_out else None,
                              w, in_scale, out_scale)
        ctx.fold_out = fold_out
        # the input gradient through the weight with l_in folded in, and l_in's gradient divided back
        # out of it, saves a pass over the [N, in] input gradient
        ctx.fold_in = keep_x and ctx.needs_input_grad[0] and _divisible(in_scale, x)
        ctx.x_shape, ctx.x_dtype = x.shape, x.dtype
        ctx.bias_dtype = bias.dtype if bias is not None else None
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad_out):
        x2, kept, w, in_scale, out_scale = ctx.saved_tensors
        with torch.autocast(grad_out.device.type, enabled=False):
            g = grad_out.reshape(-1, grad_out.shape[-1]).to(w.dtype)
            l_out = out_scale.to(g.dtype) if out_scale is not None else None
            grad_out_scale = None
            if kept is not None:  # sum_n g * pre, where pre = out / l_out when the scale is folded
                grad_out_scale = (g * kept).sum(0)
                if ctx.fold_out:
                    grad_out_scale = grad_out_scale / l_out
                grad_out_scale = grad_out_scale.to(out_scale.dtype)
            grad_bias = None
            if ctx.needs_input_grad[2]:
                grad_bias = g.sum(0) * l_out if l_out is not None else g.sum(0)
                grad_bias = grad_bias.to(ctx.bias_dtype)
            grad_x = grad_in_scale = None
            if ctx.needs_input_grad[0] or x2 is not None:
                w_out = w * l_out.unsqueeze(1) if l_out is not None else w
                if ctx.fold_in:
                    l_in = in_scale.to(w.dtype)
                    grad_x = g @ (w_out * l_in)  # [N, in]
                    grad_in_scale = ((grad_x * x2).sum(0) / l_in).to(in_scale.dtype)
                else:
                    g_xs = g @ w_out  # dL/d(x * l_in), [N, in]
                    if x2 is not None:
                        grad_in_scale = (g_xs * x2).sum(0).to(in_scale.dtype)
                    if ctx.needs_input_grad[0]:
                        grad_x = g_xs.mul_(in_scale.to(g_xs.dtype)) if in_scale is not None else g_xs
                if ctx.needs_input_grad[0]:
                    grad_x = grad_x.view(ctx.x_shape).to(ctx.x_dtype)
        return grad_x, None, grad_bias, grad_in_scale, grad_out_scale, None
