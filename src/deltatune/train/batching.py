"""Which examples go into which batch: a seeded order that any process (and a resumed run) can
rebuild exactly from ``(seed, epoch)``, split between distributed processes, and each batch cut
into pieces of similar length that waste little compute on padding."""

from __future__ import annotations

import math

import torch

MEGABATCH = 50  # batches per length-sorting window: padding drops, order stays random

#: what one more forward and backward pass costs beyond its tokens, counted in tokens: a LoRA
#: pass on MiniLM on a 2-core CPU cost 30-37 ms plus 0.38-0.42 ms per token, so 80-90 tokens;
#: rounded up, since on a GPU the fixed part of a pass is worth more tokens (bigger models: fewer)
PIECE_COST_TOKENS = 96


def epoch_batches(lengths: list[int], batch_size: int, seed: int, epoch: int,
                  group_by_length: bool = True, drop_below: int = 1) -> list[list[int]]:
    """The batches (lists of example indices) of one training epoch.

    The order is a permutation drawn from ``(seed, epoch)`` only, never from the global RNG, so
    a resumed run replays it. With ``group_by_length`` each window of ``MEGABATCH`` batches is
    sorted by length (similar lengths share a batch: less padding), the batches are shuffled
    again, and the one with the longest example goes first, so an out-of-memory shows at once.
    Batches with fewer than ``drop_below`` examples (the last one, at most) are dropped.
    """
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(len(lengths), generator=g).tolist()
    if group_by_length:
        window = batch_size * MEGABATCH
        order = [i for start in range(0, len(order), window)
                 for i in sorted(order[start:start + window], key=lambda k: -lengths[k])]
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    if group_by_length and len(batches) > 1:
        batches = [batches[p] for p in torch.randperm(len(batches), generator=g).tolist()]
        longest = max(range(len(batches)), key=lambda b: max(lengths[i] for i in batches[b]))
        batches.insert(0, batches.pop(longest))
    return [b for b in batches if len(b) >= drop_below]


def shard(batch: list[int], rank: int, world_size: int) -> list[int]:
    """This process's part of a global batch (strided, so parts of a length-sorted batch match)."""
    return batch[rank::world_size]


def length_pieces(batch: list[int], lengths: list[int], piece_cost: float = PIECE_COST_TOKENS,
                  power: int = 1) -> list[list[int]]:
    """``batch`` cut into pieces of similar length, longest first, at the cuts that minimise the
    padded tokens computed plus ``piece_cost`` per piece. With ``power`` 2 a piece costs its
    examples times the square of its length instead (what attention computes).

    Trained one after the other, each piece's mean loss weighted by its share of the batch (as
    gradient accumulation weights micro-batches), the pieces give the update of the whole batch
    padded to its longest example, while which examples share a step stays random. A batch of
    equal lengths stays whole.
    """
    order = sorted(batch, key=lambda i: -lengths[i])
    # one cut candidate per distinct length: runs of equal length never need cutting
    runs: list[int] = []  # end (exclusive) of each run of equal length in ``order``
    for k in range(1, len(order) + 1):
        if k == len(order) or lengths[order[k]] != lengths[order[k - 1]]:
            runs.append(k)
    # best[j]: least cost of the first runs[j - 1] examples; a piece starting at example s is as
    # long as its first (longest) example
    starts = [0] + runs[:-1]
    best, cut = [0.0] + [math.inf] * len(runs), [0] * (len(runs) + 1)
    for j in range(1, len(runs) + 1):
        for i in range(j):
            cost = best[i] + (runs[j - 1] - starts[i]) * lengths[order[starts[i]]] ** power + piece_cost
            if cost < best[j]:
                best[j], cut[j] = cost, i
    pieces, j = [], len(runs)
    while j:
        pieces.append(order[starts[cut[j]]:runs[j - 1]])
        j = cut[j]
    return pieces[::-1]


def eval_batches(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Evaluation batches: longest first, no shuffling (the metrics do not depend on order)."""
    order = sorted(range(len(lengths)), key=lambda k: -lengths[k])
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
