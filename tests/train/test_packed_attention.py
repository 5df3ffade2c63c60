"""The packed attention of a whole layer (train/packed_attention.py) against each sequence's own
attention: torch's SDPA on that sequence alone, and softmax attention written out with the same
dropout masks; values and gradients, for plain, grouped-query and causal attention."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from deltatune.core.dropout import mask_and_factor
from deltatune.train.packed_attention import GroupLayout, grouped_attention
from deltatune.train.packing import PackedBatch

LENGTHS = [7, 3, 5, 1, 6, 7, 2, 12, 12, 4, 20, 17]  # rows under and over one vector of floats
DIM, SCALE = 8, 0.3
HEADS = [(4, 4), (4, 2), (6, 1)]


def packed_batch() -> PackedBatch:
    mask = torch.zeros(len(LENGTHS), max(LENGTHS), dtype=torch.long)
    for row, length in enumerate(LENGTHS):
        mask[row, :length] = 1
    batch = PackedBatch(mask, group_cost=30)
    assert len(batch.groups) >= 3 and any(g.key_mask is not None for g in batch.groups)  # ragged groups
    return batch


def inputs(heads: int, kv_heads: int, total: int, seed: int = 0) -> list[torch.Tensor]:
    """Leaf tensors ``(1, L, heads, dim)`` as a model's projections give them (heads split off)."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(1, total, h, DIM, generator=gen, dtype=torch.float64, requires_grad=True)
            for h in (heads, kv_heads, kv_heads)]


def attend(batch: PackedBatch, leaves: list[torch.Tensor], causal: bool, p: float = 0.0) -> torch.Tensor:
    query, key, value = (t.transpose(1, 2) for t in leaves)
    layout = GroupLayout(batch.groups, batch.total, query.shape[1], key.shape[1], causal, torch.float64)
    return grouped_attention(query, key, value, layout, p, SCALE)


def per_sequence(leaves: list[torch.Tensor], causal: bool, weights=None) -> torch.Tensor:
    """Each sequence alone through ``scaled_dot_product_attention`` (``weights`` None), or
    through softmax attention written out with ``weights(sequence, probabilities)`` applied to the
    probabilities."""
    query, key, value = leaves
    share = query.shape[2] // key.shape[2]
    outs, start = [], 0
    for seq, length in enumerate(LENGTHS):
        q, k, v = (t[0, start:start + length].transpose(0, 1) for t in (query, key, value))  # (heads, len, dim)
        k, v = k.repeat_interleave(share, 0), v.repeat_interleave(share, 0)
        if weights is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=SCALE)
        else:
            scores = q @ k.transpose(1, 2) * SCALE
            if causal:
                scores = scores.masked_fill(torch.ones(length, length, dtype=torch.bool).triu(1), float("-inf"))
            out = weights(seq, scores.softmax(-1)) @ v
        outs.append(out.transpose(0, 1))
        start += length
    return torch.cat(outs)[None]


def grads(out: torch.Tensor, leaves: list[torch.Tensor]) -> list[torch.Tensor]:
    upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(9), dtype=out.dtype)
    return torch.autograd.grad(out, leaves, upstream)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("heads,kv_heads", HEADS)
def test_each_sequence_attends_to_itself_as_sdpa_computes_it(causal, heads, kv_heads):
    batch = packed_batch()
    leaves = inputs(heads, kv_heads, batch.total)
    got, want = attend(batch, leaves, causal), per_sequence(leaves, causal)
    torch.testing.assert_close(got, want)
    for a, b in zip(grads(got, leaves), grads(want, leaves)):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("causal", [False, True])
def test_the_written_gradient_is_the_numerical_one(causal):
    batch = packed_batch()
    leaves = inputs(4, 2, batch.total)
    assert torch.autograd.gradcheck(lambda *t: attend(batch, list(t), causal), tuple(leaves), fast_mode=True)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("heads,kv_heads", HEADS)
def test_dropout_scales_the_probabilities_by_one_mask_drawn_for_the_layer(causal, heads, kv_heads):
    """The layer draws one mask over every group's scores, laid out per group as
    (key head, sequence, query head of that key head, query, key)."""
    batch, p = packed_batch(), 0.4
    leaves = inputs(heads, kv_heads, batch.total)
    torch.manual_seed(5)
    got = attend(batch, leaves, causal, p)
    layout = GroupLayout(batch.groups, batch.total, heads, kv_heads, causal, torch.float64)
    torch.manual_seed(5)
    _, factor = mask_and_factor(layout.score_count, p)
    factor = torch.from_numpy(factor).double()
    share, starts = heads // kv_heads, [sum(LENGTHS[:i]) for i in range(len(LENGTHS))]
    per_seq = {}
    for group, block in zip(batch.groups, layout.blocks):
        cube = factor[block.scores].view(kv_heads, group.count, share, group.width, group.width)
        for j, first in enumerate(group.gather.view(group.count, group.width)[:, 0].tolist()):
            seq = starts.index(first)
            n = LENGTHS[seq]
            per_seq[seq] = cube[:, j, :, :n, :n].reshape(heads, n, n)  # query head = key head x share + r
    assert sorted(per_seq) == list(range(len(LENGTHS)))
    want = per_sequence(leaves, causal, weights=lambda seq, probs: probs * per_seq[seq])
    torch.testing.assert_close(got, want)
    for a, b in zip(grads(got, leaves), grads(want, leaves)):
        torch.testing.assert_close(a, b)
    dropped = float((factor == 0).double().mean())
    assert abs(dropped - p) < 0.05  # the draw is dropout's: about p of the weights are zero


def test_heads_that_key_heads_cannot_share_evenly_are_refused():
    batch = packed_batch()
    with pytest.raises(ValueError, match="6 query heads cannot share 4 key heads"):
        GroupLayout(batch.groups, batch.total, 6, 4, False, torch.float32)
