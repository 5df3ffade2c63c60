"""An LRU cache of adapters loaded on one base model: at most ``capacity`` stay in memory."""

from __future__ import annotations

import os
from collections import OrderedDict
from typing import Callable

from deltatune.core.model import AdaptedModel
from deltatune.errors import AdapterError

#: how many evicted names :meth:`AdapterCache.evicted` remembers (bounded: names may churn forever)
EVICTED_KEPT = 1000


class AdapterCache:
    """Loads adapters on demand and evicts the least recently used one beyond ``capacity``.

    ``pinned`` adapters (e.g. those named on the server's command line) are never evicted.
    """

    def __init__(self, model: AdaptedModel, capacity: int, pinned: tuple[str, ...] = ()):
        if capacity < 1:
            raise AdapterError(f"capacity must be at least 1, got {capacity}")
        self.model = model
        self.capacity = capacity
        self.pinned = set(pinned)
        self._order: OrderedDict[str, str | None] = OrderedDict((n, None) for n in model.adapter_names)
        self._evicted: OrderedDict[str, None] = OrderedDict()  # evicted and not loaded since, oldest first
        self.evictions = 0  #: adapters evicted so far

    def __contains__(self, name: str) -> bool:
        return name in self._order

    def names(self) -> list[str]:
        """Loaded adapters, least recently used first."""
        return list(self._order)

    def evicted(self) -> list[str]:
        """Adapters evicted and not loaded again since, oldest first (the latest :data:`EVICTED_KEPT`)."""
        return list(self._evicted)

    def touch(self, name: str) -> None:
        """Mark ``name`` as just used."""
        if name not in self._order:
            raise AdapterError(f"adapter {name!r} is not loaded; loaded: {self.names()}")
        self._order.move_to_end(name)

    def load(self, name: str, directory: str | os.PathLike,
             check: Callable[[str], None] | None = None) -> list[str]:
        """Load ``directory`` as ``name`` (a no-op if it is loaded); returns the evicted names.
        ``check(name)`` may refuse the loaded adapter by raising: it is removed again, before
        anything is evicted for it."""
        if name in self._order:
            self.touch(name)
            return []
        self.model.load(directory, name)
        if check is not None:
            try:
                check(name)
            except Exception:
                self.model.remove(name)
                raise
        self._order[name] = str(directory)
        self._evicted.pop(name, None)
        return self._evict()

    def remove(self, name: str) -> None:
        if name not in self._order:
            raise AdapterError(f"adapter {name!r} is not loaded; loaded: {self.names()}")
        self.model.remove(name)
        del self._order[name]
        self.pinned.discard(name)

    def _evict(self) -> list[str]:
        evicted = []
        while len(self._order) > self.capacity:
            victim = next((n for n in self._order if n not in self.pinned), None)
            if victim is None:
                break
            self.remove(victim)
            evicted.append(victim)
            self.evictions += 1
            self._evicted[victim] = None
            if len(self._evicted) > EVICTED_KEPT:
                self._evicted.popitem(last=False)
        return evicted
