"""Which examples go into which batch: a seeded, length-grouped order that any process (and a
resumed run) can rebuild exactly from ``(seed, epoch)``, split between distributed processes."""

from __future__ import annotations

import torch

MEGABATCH = 50  # batches per length-sorting window: padding drops, order stays random


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


def eval_batches(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Evaluation batches: longest first, no shuffling (the metrics do not depend on order)."""
    order = sorted(range(len(lengths)), key=lambda k: -lengths[k])
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
