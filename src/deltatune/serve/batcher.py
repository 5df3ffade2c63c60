"""Cross-adapter batching: concurrent requests, whatever their adapter, become one model call.

Requests wait in a bounded FIFO queue. A single worker task takes the requests at its head
until ``max_batch`` rows are collected or ``max_wait_ms`` has passed since the first one, and
runs them as one batch on a dedicated model thread, so the event loop keeps answering while the
model computes. Other work on the model (loading or removing adapters, generation) is queued
as a *call* in the same FIFO and runs on the same thread between batches, so nothing changes
the model while a batch is in flight.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from deltatune.errors import ConfigError
from deltatune.serve.errors import QueueFull, QueueTimeout, RequestError
from deltatune.serve.settings import DEFAULTS

log = logging.getLogger("deltatune.serve")

#: run on the model thread: one ``(key, rows)`` per request in, one result (or exception) per request out
BatchFn = Callable[[list[tuple[str, list]]], Sequence[Any]]


@dataclass(eq=False)
class _Item:
    future: asyncio.Future
    key: str = ""
    rows: list = field(default_factory=list)
    call: Callable[[], Any] | None = None  # set for exclusive work instead of rows
    bounded: bool = True


@dataclass
class BatchStats:
    """What the batcher did, for ``/metrics``: one entry per batch run."""

    batches: int = 0
    rows: int = 0
    requests: int = 0
    sizes: deque = field(default_factory=lambda: deque(maxlen=10_000))  # rows per recent batch
    adapter_groups: int = 0  # distinct keys summed over all batches (the mean divides by batches, like rows)


class Batcher:
    """Collects requests into mixed batches for ``run_batch`` and runs calls between batches.

    Start it inside the event loop that serves requests (:meth:`start`), stop it on shutdown.
    """

    def __init__(self, run_batch: BatchFn, *, max_batch: int = DEFAULTS.max_batch,
                 max_wait_ms: float = DEFAULTS.max_wait_ms, queue_size: int = DEFAULTS.queue_size,
                 max_queue_ms: float = DEFAULTS.max_queue_ms) -> None:
        if max_batch < 1 or queue_size < 1 or max_wait_ms < 0 or max_queue_ms < 0:
            raise ConfigError(f"max_batch ({max_batch}) and queue_size ({queue_size}) must be at least 1, "
                              f"max_wait_ms ({max_wait_ms}) and max_queue_ms ({max_queue_ms}) at least 0")
        self.run_batch = run_batch
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1000
        self.queue_size = queue_size
        self.max_queue = max_queue_ms / 1000  # 0: requests wait as long as it takes
        self.stats = BatchStats()
        self._pending: deque[_Item] = deque()
        self._bounded = 0  # items in _pending that count against queue_size
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._in_flight: list[_Item] = []
        self._executor: ThreadPoolExecutor | None = None

    # --- life cycle -----------------------------------------------------------------------
    async def start(self) -> None:
        """Start the worker task in the running event loop and the model thread."""
        self._wake = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="deltatune-model")
        self._task = asyncio.get_running_loop().create_task(self._work(), name="deltatune-batcher")

    async def stop(self) -> None:
        """Stop taking work, fail what is still queued (503) and wait for the batch in flight."""
        await cancel_and_wait(self._task)
        self._task = None
        for item in [*self._in_flight, *self._pending]:
            _settle(item.future, RequestError(503, "the server is shutting down"))
        self._pending.clear()
        self._in_flight = []
        self._bounded = 0
        if self._executor is not None:
            executor, self._executor = self._executor, None
            # the batch in flight may run for seconds: wait for it off the event loop, which other
            # coroutines (health checks, the rest of the shutdown) still need
            await asyncio.to_thread(executor.shutdown, wait=True)

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    @property
    def depth(self) -> int:
        """Requests and calls waiting (the batch in flight not counted)."""
        return len(self._pending)

    # --- submitting -----------------------------------------------------------------------
    async def submit(self, key: str, rows: list) -> Any:
        """Queue ``rows`` for adapter ``key``; returns this request's part of its batch's result.
        Raises :class:`QueueFull` at once when the queue is full."""
        return await self._enqueue(_Item(self._new_future(), key=key, rows=list(rows)))

    async def call(self, fn: Callable[[], Any], *, bounded: bool = True) -> Any:
        """Run ``fn()`` on the model thread, alone, in queue order. Unbounded calls (admin work)
        are never refused as queue-full."""
        return await self._enqueue(_Item(self._new_future(), call=fn, bounded=bounded))

    def _new_future(self) -> asyncio.Future:
        if not self.running:
            raise RequestError(503, "the server is not running its model worker")
        return asyncio.get_running_loop().create_future()

    async def _enqueue(self, item: _Item) -> Any:
        if item.bounded:
            if self._bounded >= self.queue_size:
                raise QueueFull(self._bounded)
            self._bounded += 1
        self._pending.append(item)
        self._wake.set()
        if not (item.bounded and self.max_queue):
            # a client that goes away cancels this await, which cancels the future: the worker skips it
            return await item.future
        timer = asyncio.get_running_loop().call_later(self.max_queue, self._shed, item)
        try:
            return await item.future
        finally:
            timer.cancel()

    def _shed(self, item: _Item) -> None:
        """Answer ``item`` 503 if it is still waiting (not if the model has it already)."""
        if item in self._pending:  # _Item compares by identity
            self._pending.remove(item)
            self._bounded -= 1
            _settle(item.future, QueueTimeout(self.max_queue * 1000))

    def _pop(self) -> _Item:
        item = self._pending.popleft()
        self._bounded -= item.bounded
        return item

    # --- the worker -----------------------------------------------------------------------
    async def _work(self) -> None:
        while True:
            while not self._pending:
                self._wake.clear()
                await self._wake.wait()
            try:
                if self._pending[0].call is not None:
                    item = self._pop()
                    if not item.future.cancelled():
                        await self._run_call(item)
                    continue
                batch = await self._collect()
                if batch:
                    await self._run_batch(batch)
            except asyncio.CancelledError:
                raise
            except Exception:  # a bug here must not stop the server: log it, keep serving
                log.exception("batcher worker error")

    async def _collect(self) -> list[_Item]:
        """Take row requests from the head of the queue until the batch is full, a call or a
        request that does not fit is next, or the wait since the first request is over."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.max_wait
        batch: list[_Item] = []
        rows = 0
        while True:
            while self._pending:
                head = self._pending[0]
                if head.call is not None or (batch and rows + len(head.rows) > self.max_batch):
                    return batch
                self._pop()
                if not head.future.cancelled():
                    batch.append(head)
                    rows += len(head.rows)
            if rows >= self.max_batch:
                return batch
            remaining = deadline - loop.time()
            if remaining <= 0:
                return batch
            self._wake.clear()
            try:
                # the event carries no data, so a timeout here cannot lose a request
                await asyncio.wait_for(self._wake.wait(), remaining)
            except asyncio.TimeoutError:
                return batch

    async def _run_batch(self, batch: list[_Item]) -> None:
        requests = [(item.key, item.rows) for item in batch]
        loop = asyncio.get_running_loop()
        self._in_flight = batch
        try:
            results = await loop.run_in_executor(self._executor, self.run_batch, requests)
            if len(results) != len(batch):
                raise RuntimeError(f"run_batch returned {len(results)} results for {len(batch)} requests")
        except Exception as exc:  # the whole batch failed: every request in it gets the error
            results = [exc] * len(batch)
        self._in_flight = []  # not on cancellation: stop() answers the batch in flight
        stats = self.stats
        stats.batches += 1
        stats.requests += len(batch)
        stats.rows += sum(len(r) for _, r in requests)
        stats.sizes.append(sum(len(r) for _, r in requests))
        stats.adapter_groups += len({k for k, _ in requests})
        for item, result in zip(batch, results):
            _settle(item.future, result)

    async def _run_call(self, item: _Item) -> None:
        loop = asyncio.get_running_loop()
        self._in_flight = [item]
        try:
            result = await loop.run_in_executor(self._executor, item.call)
        except Exception as exc:
            result = exc
        self._in_flight = []
        _settle(item.future, result)


async def cancel_and_wait(task: asyncio.Task | None) -> None:
    """Cancel ``task`` (if any) and wait until it has stopped."""
    if task is None:
        return
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        pass


def _settle(future: asyncio.Future, result: Any) -> None:
    if future.done():  # cancelled by a client that went away
        return
    if isinstance(result, BaseException):
        future.set_exception(result)
    else:
        future.set_result(result)
