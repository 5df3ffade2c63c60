"""A layer's packed attention on a CPU, every group of sequences at once, as one autograd function.

:class:`~deltatune.train.packing.PackedBatch` attends sequence by sequence, in groups of similar
length. Written with tensor ops, each group took about twenty small ops forward and more backward,
each a node of the autograd graph: on MiniLM with batches of 32 SST-2 sentences (about six
groups), 14 ms a layer at 2 threads, two fifths of the training step, for well under a
millisecond of arithmetic. :func:`grouped_attention` does the layer in one function. It gathers
every group's queries, keys and values with one index each, computes each group's scores,
softmax, dropout and weighted sum as batched matrix products into shared buffers, and computes
the gradient itself. With ``P`` the softmax probabilities, ``M`` the dropout factor (the keep mask
times ``1 / (1 - p)``) and ``s`` the scale:

    O = (P * M) V,   dV = (P * M)^T dO,   dP = (dO V^T) * M,
    dS = P * (dP - rowsum(dP * P)),   dQ = s dS K,   dK = s dS^T Q.

Rows of a group beyond a sequence's length repeat one of its tokens. Their keys are masked
(causal groups never reach them from a real query), and their queries' outputs are dropped, so
every gradient they carry is exactly zero. Grouped-query attention puts each key head's query
heads in one product: the query rows of a group are laid out (key head, sequence, query head of
that key head, position). The dropout masks of a layer come from one draw of
:func:`deltatune.core.dropout.mask_and_factor`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from deltatune.core.dropout import factor_of, mask_and_factor


@dataclass(frozen=True)
class _Block:
    """One group's share of the layer's buffers."""

    queries: slice    #: rows of the query (and output) buffer
    keys: slice       #: rows of the key and value buffers
    scores: slice     #: elements of the flat scores
    batch: int        #: key heads x sequences
    rows: int         #: query rows per batch entry: query heads per key head x width
    width: int
    bias: torch.Tensor | None  #: additive mask, broadcast to (batch, rows, width); None: attend everywhere


class GroupLayout:
    """Where each group's queries, keys and values sit in the packed ``(token, head)`` rows, for
    ``heads`` query and ``kv_heads`` key heads. Built once per batch and reused by every layer.

    ``groups`` are :class:`~deltatune.train.packing.PackedBatch`'s: per group, ``gather`` (the
    packed token of each of its ``count x width`` rows), and ``key_mask`` (True at real keys, or
    None when every sequence fills the width)."""

    def __init__(self, groups: Sequence, total: int, heads: int, kv_heads: int, causal: bool,
                 dtype: torch.dtype) -> None:
        if heads % kv_heads:
            raise ValueError(f"{heads} query heads cannot share {kv_heads} key heads evenly")
        self.total, self.heads, self.kv_heads = total, heads, kv_heads
        share = heads // kv_heads
        lowest = torch.finfo(dtype).min
        query_rows, key_rows, back_rows, key_real, self.blocks = [], [], [], [], []
        q_at = k_at = s_at = 0
        kv_head = torch.arange(kv_heads)
        q_head = (kv_head[:, None] * share + torch.arange(share)[None, :])[:, None, :, None]  # (kv, 1, share, 1)
        for g in groups:
            count, width = g.count, g.width
            tokens = g.gather.view(count, width).cpu()
            real = g.key_mask.view(count, width).cpu() if g.key_mask is not None else None
            q = (tokens[None, :, None, :] * heads + q_head)  # (kv, count, share, width)
            query_rows.append(q.reshape(-1))
            key_rows.append((tokens[None] * kv_heads + kv_head[:, None, None]).reshape(-1))
            back = q if real is None else q.masked_fill(~real[None, :, None, :], total * heads)
            back_rows.append(back.reshape(-1))
            key_real.append((torch.ones(count, width, dtype=torch.bool) if real is None else real).expand(
                kv_heads, count, width).reshape(-1))
            bias = None
            if causal and width > 1:
                bias = torch.full((width, width), lowest, dtype=dtype).triu(1).repeat(share, 1)[None]
            elif not causal and real is not None:
                bias = torch.zeros(count, 1, width, dtype=dtype).masked_fill(~real[:, None, :], lowest)
                bias = bias.repeat(kv_heads, 1, 1)
            batch, rows = kv_heads * count, share * width
            self.blocks.append(_Block(slice(q_at, q_at + batch * rows), slice(k_at, k_at + batch * width),
                                      slice(s_at, s_at + batch * rows * width), batch, rows, width, bias))
            q_at, k_at, s_at = q_at + batch * rows, k_at + batch * width, s_at + batch * rows * width
        self.query_rows, self.key_rows = torch.cat(query_rows), torch.cat(key_rows)
        #: each query buffer row's output row (token x heads + head), or the zero row past the end
        self.back_rows = torch.cat(back_rows)
        #: each output (and query) row's row in the query buffer: where its one real copy is
        self.out_rows = _inverse(self.back_rows, total * heads)
        #: each key (and value) row's row in the key buffer
        self.key_out_rows = _inverse(self.key_rows.masked_fill(~torch.cat(key_real), total * kv_heads),
                                     total * kv_heads)
        self.score_count = s_at

    def to(self, device: torch.device) -> GroupLayout:
        for name in ("query_rows", "key_rows", "back_rows", "out_rows", "key_out_rows"):
            setattr(self, name, getattr(self, name).to(device))
        return self


def _inverse(rows: torch.Tensor, count: int) -> torch.Tensor:
    """For each of ``count`` targets, the position in ``rows`` that holds it (``rows`` holds each
    target once; other entries are ``count``: padding)."""
    real = (rows < count).nonzero().squeeze(1)
    inverse = torch.empty(count, dtype=torch.long)
    inverse[rows[real]] = real
    return inverse


def _rows(t: torch.Tensor) -> torch.Tensor:
    """``(1, heads, L, dim)`` -> ``(L * heads, dim)``, row ``token * heads + head`` (a view when
    the heads were split off the hidden size, as most models do)."""
    return t[0].transpose(0, 1).reshape(-1, t.shape[-1])


class _GroupedAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, query, key, value, layout: GroupLayout, p: float, scale: float):
        heads, total = layout.heads, layout.total
        q = _rows(query).index_select(0, layout.query_rows)
        k = _rows(key).index_select(0, layout.key_rows)
        v = _rows(value).index_select(0, layout.key_rows)
        keep = factor = None
        if p > 0:
            keep, factor = mask_and_factor(layout.score_count, p)
            factor = torch.from_numpy(factor).to(query.dtype)
        out = q.new_empty(q.shape[0], v.shape[1])
        probs = []
        for b in layout.blocks:
            qb = q[b.queries].view(b.batch, b.rows, -1)
            kb = k[b.keys].view(b.batch, b.width, -1)
            if b.bias is None:
                scores = torch.bmm(qb, kb.transpose(1, 2)).mul_(scale)
            else:
                scores = torch.baddbmm(b.bias, qb, kb.transpose(1, 2), alpha=scale)
            prob = torch.softmax(scores, dim=-1)
            probs.append(prob)
            kept = prob if factor is None else prob * factor[b.scores].view_as(prob)
            torch.bmm(kept, v[b.keys].view(b.batch, b.width, -1), out=out[b.queries].view(b.batch, b.rows, -1))
        ctx.save_for_backward(q, k, v, *probs)
        ctx.layout, ctx.keep, ctx.p, ctx.scale = layout, keep, p, scale
        ctx.shapes = (query.shape, key.shape, value.shape)
        return out.index_select(0, layout.out_rows).view(1, total, heads, v.shape[1])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        q, k, v, *probs = ctx.saved_tensors
        layout, scale = ctx.layout, ctx.scale
        grad_rows = grad_out.reshape(-1, grad_out.shape[-1])
        grad_rows = torch.cat([grad_rows, grad_rows.new_zeros(1, grad_rows.shape[1])])  # the padding's row
        grad_o = grad_rows.index_select(0, layout.back_rows)
        factor = None
        if ctx.keep is not None:
            factor = factor_of(ctx.keep, ctx.p).to(q.dtype)
        grad_q, grad_k, grad_v = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        for b, prob in zip(layout.blocks, probs):
            go = grad_o[b.queries].view(b.batch, b.rows, -1)
            vb = v[b.keys].view(b.batch, b.width, -1)
            drop = None if factor is None else factor[b.scores].view_as(prob)
            kept = prob if drop is None else prob * drop
            torch.bmm(kept.transpose(1, 2), go, out=grad_v[b.keys].view(b.batch, b.width, -1))
            grad_prob = torch.bmm(go, vb.transpose(1, 2))
            if drop is not None:
                grad_prob.mul_(drop)
            grad_scores = torch._softmax_backward_data(grad_prob, prob, -1, prob.dtype).mul_(scale)
            torch.bmm(grad_scores, k[b.keys].view(b.batch, b.width, -1),
                      out=grad_q[b.queries].view(b.batch, b.rows, -1))
            torch.bmm(grad_scores.transpose(1, 2), q[b.queries].view(b.batch, b.rows, -1),
                      out=grad_k[b.keys].view(b.batch, b.width, -1))
        # the rows of padding carry zero gradients: each token's gradient is that of its real row
        grads = [grad.index_select(0, rows).view(1, shape[2], shape[1], shape[3]).transpose(1, 2)
                 for grad, rows, shape in ((grad_q, layout.out_rows, ctx.shapes[0]),
                                           (grad_k, layout.key_out_rows, ctx.shapes[1]),
                                           (grad_v, layout.key_out_rows, ctx.shapes[2]))]
        return (*grads, None, None, None)


def grouped_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, layout: GroupLayout,
                      p: float, scale: float) -> torch.Tensor:
    """Softmax attention of ``query`` ``(1, heads, L, dim)`` over ``key`` and ``value`` ``(1,
    kv_heads, L, dim)``, each sequence of ``layout`` attending to itself (causally when the layout
    is causal), with dropout ``p`` on the probabilities. Returns ``(1, L, heads, dim)``."""
    return _GroupedAttention.apply(query, key, value, layout, p, scale)
