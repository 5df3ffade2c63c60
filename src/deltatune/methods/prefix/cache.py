"""Turning the flat prefix table into the transformers ``Cache`` a model reads keys/values from.

The table is ``[tokens, num_layers * 2 * token_dim]``; viewed as ``[tokens, 2 * num_layers,
heads, head_dim]``, entry ``2l`` is layer ``l``'s key and ``2l + 1`` its value (HF PEFT's layout).
"""

from __future__ import annotations

import torch
from transformers import DynamicCache, EncoderDecoderCache

#: attribute set on caches built here: how many prefix positions they hold
LENGTH_ATTR = "deltatune_prefix_length"


def layer_pairs(num_layers: int, submodules: int) -> list[tuple[int, int]]:
    """For each cached layer, the entries of the viewed table holding its key and value.

    With two submodules (encoder-decoder), PEFT stacks the table twice and hands each layer four
    consecutive entries, of which the decoder self-attention gets the first two: layer ``i`` reads
    entries ``4i`` and ``4i + 1`` modulo ``2 * num_layers``.
    """
    entries = 2 * num_layers
    stride = 2 * submodules
    return [((stride * i) % entries, (stride * i + 1) % entries) for i in range(num_layers)]


def keys_and_values(table: torch.Tensor, batch: int, num_layers: int, heads: int, submodules: int,
                    dtype: torch.dtype) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer, ``(key, value)`` of shape ``[batch, heads, tokens, head_dim]``."""
    tokens = table.shape[0]
    viewed = table.to(dtype).view(tokens, 2 * num_layers, heads, -1).permute(1, 2, 0, 3)
    out = []
    for k, v in layer_pairs(num_layers, submodules):
        out.append((viewed[k].unsqueeze(0).expand(batch, -1, -1, -1).contiguous(),
                    viewed[v].unsqueeze(0).expand(batch, -1, -1, -1).contiguous()))
    return out


def extend_cache(cache, pairs: list[tuple[torch.Tensor, torch.Tensor]], encoder_decoder: bool):
    """A cache holding ``pairs`` in front: a new one, or ``cache`` (another adapter's prefix)
    with these appended, so that stacked prefix adapters read both."""
    if cache is None:
        cache = EncoderDecoderCache(DynamicCache(), DynamicCache()) if encoder_decoder else DynamicCache()
        setattr(cache, LENGTH_ATTR, 0)
    target = cache.self_attention_cache if isinstance(cache, EncoderDecoderCache) else cache
    for layer, (key, value) in enumerate(pairs):
        target.update(key, value, layer)
    setattr(cache, LENGTH_ATTR, getattr(cache, LENGTH_ATTR) + pairs[0][0].shape[2])
    return cache
