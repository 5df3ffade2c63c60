"""Many adapters on one base: weighted combination, hot swap, an LRU adapter cache.

Mixed-adapter batches are routed by :mod:`deltatune.core.routing`, since every forward passes there."""

from deltatune.compose.adapter_cache import AdapterCache
from deltatune.compose.combine import combine
from deltatune.compose.swap import hot_swap
from deltatune.core.model import provide

# AdaptedModel.combine(...) and .hot_swap(...) call these; the core cannot import compose
provide("combine", combine)
provide("hot_swap", hot_swap)

__all__ = ["combine", "hot_swap", "AdapterCache"]
