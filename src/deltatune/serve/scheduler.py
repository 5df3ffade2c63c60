"""Continuous batching for generation: requests join the running batch at the next step and
leave the moment they finish, whatever their adapter.

An event-loop task runs the steps: it admits waiting requests (first come, first served) while
the bounds allow (``max_running`` sequences, ``max_prefill_tokens`` prompt tokens per step,
``max_kv_tokens`` prompt plus new tokens reserved over all running sequences), then runs one
:meth:`RunningBatch.step` on the model thread as a batcher *call*, so adapter loads and
classification work interleave with steps and never change the model during one. Each request
reads its text pieces from its own queue as the steps make them.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable

from deltatune.errors import ConfigError
from deltatune.serve.batcher import Batcher, cancel_and_wait
from deltatune.serve.errors import QueueFull, QueueTimeout, RequestError
from deltatune.serve.running_batch import RunningBatch, Sequence
from deltatune.serve.settings import DEFAULTS

log = logging.getLogger("deltatune.serve")


@dataclass(eq=False)
class Generation:
    """One request in the scheduler: iterate :meth:`pieces` for its text as it is made."""

    seq: Sequence
    arrived: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    finished_at: float | None = None
    reported_tokens: int = 0  #: new tokens the metrics have counted
    _updates: asyncio.Queue = field(default_factory=asyncio.Queue)

    @property
    def reserved(self) -> int:
        """KV-cache tokens this request may come to hold."""
        return len(self.seq.prompt) + self.seq.params.max_tokens

    async def pieces(self) -> AsyncIterator[str]:
        """The new text, piece by piece, until the sequence finishes; raises the error it met.
        Closing the iterator early (a client that went away) cancels the request."""
        try:
            while True:
                piece, done = await self._updates.get()
                if piece:
                    yield piece
                if done:
                    break
        finally:
            self.cancel()
        if self.seq.error is not None:
            raise self.seq.error

    async def text(self) -> str:
        """All of the new text, once finished."""
        return "".join([piece async for piece in self.pieces()])

    def cancel(self) -> None:
        """Free this request's slot at the next step (a no-op once finished)."""
        self.seq.cancelled = True


class Scheduler:
    """Runs :class:`Generation` requests in one continuously refilled batch on ``batcher``'s model thread."""

    def __init__(self, batch: RunningBatch, batcher: Batcher, *, max_running: int = DEFAULTS.max_running,
                 max_prefill_tokens: int = DEFAULTS.max_prefill_tokens, max_kv_tokens: int = DEFAULTS.max_kv_tokens,
                 queue_size: int = DEFAULTS.queue_size, max_queue_ms: float = DEFAULTS.max_queue_ms, on_step: Callable[["Scheduler", float, list], None] | None = None,
                 before_step: Callable[[list[str]], None] | None = None) -> None:
        if min(max_running, max_prefill_tokens, max_kv_tokens, queue_size) < 1 or max_queue_ms < 0:
            raise ConfigError(f"max_running ({max_running}), max_prefill_tokens ({max_prefill_tokens}), "
                              f"max_kv_tokens ({max_kv_tokens}) and queue_size ({queue_size}) must be at least 1, "
                              f"max_queue_ms ({max_queue_ms}) at least 0")
        self.batch = batch
        self.batcher = batcher
        self.max_running = max_running
        self.max_prefill_tokens = max_prefill_tokens
        self.max_kv_tokens = max_kv_tokens
        self.queue_size = queue_size
        self.max_queue = max_queue_ms / 1000  #: seconds a request may wait to join; 0: no deadline
        self.on_step = on_step  #: after each step: (scheduler, its seconds, the finished requests)
        self.before_step = before_step  #: called on the model thread with the running adapters
        self.waiting: deque[Generation] = deque()
        self.running: list[Generation] = []
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None

    # --- life cycle -----------------------------------------------------------------------
    async def start(self) -> None:
        """Start the stepping task in the running event loop (the batcher must be started too)."""
        self._wake = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._work(), name="deltatune-scheduler")

    async def stop(self) -> None:
        """Stop stepping; running and waiting requests end with a 503."""
        await cancel_and_wait(self._task)
        self._task = None
        for gen in [*self.running, *self.waiting]:
            gen.seq.finish_reason, gen.seq.error = "error", RequestError(503, "the server is shutting down")
            gen._updates.put_nowait(("", True))
        self.running, self.waiting = [], deque()

    # --- submitting -----------------------------------------------------------------------
    def submit(self, seq: Sequence) -> Generation:
        """Queue ``seq``; raises :class:`QueueFull` (429) when ``queue_size`` requests wait already,
        a 400 when it could never fit the KV-cache budget."""
        if self._task is None or self._task.done():
            raise RequestError(503, "the server is not running its generation worker")
        gen = Generation(seq)
        if gen.reserved > self.max_kv_tokens:
            raise RequestError(400, f"prompt ({len(seq.prompt)} tokens) plus max_tokens ({seq.params.max_tokens}) "
                                    f"exceeds the server's KV-cache budget of {self.max_kv_tokens} tokens; "
                                    f"ask for fewer tokens")
        if len(self.waiting) >= self.queue_size:
            raise QueueFull(len(self.waiting))
        self.waiting.append(gen)
        self._wake.set()
        return gen

    # --- the worker -----------------------------------------------------------------------
    def _shed_expired(self) -> None:
        """Answer 503 to the requests that waited longer than ``max_queue_ms`` to join; they are
        the oldest, so they sit at the head of the queue."""
        if not self.max_queue:
            return
        now = time.perf_counter()
        while self.waiting and now - self.waiting[0].arrived > self.max_queue:
            gen = self.waiting.popleft()
            gen.seq.finish_reason, gen.seq.error = "error", QueueTimeout((now - gen.arrived) * 1000)
            gen._updates.put_nowait(("", True))

    def _admit(self) -> list[Generation]:
        """Waiting requests that join at this step, first come first served, within the bounds."""
        self._shed_expired()
        while self.waiting and self.waiting[0].seq.cancelled:
            self.waiting.popleft()
        joining: list[Generation] = []
        reserved = sum(g.reserved for g in self.running)
        prefill = 0
        while self.waiting and len(self.running) + len(joining) < self.max_running:
            head = self.waiting[0]
            if head.seq.cancelled:
                self.waiting.popleft()
                continue
            tokens = len(head.seq.prompt)
            if reserved + head.reserved > self.max_kv_tokens or (joining and prefill + tokens > self.max_prefill_tokens):
                break
            joining.append(self.waiting.popleft())
            reserved += head.reserved
            prefill += tokens
        return joining

    async def _work(self) -> None:
        while True:
            try:
                await self._step()
            except asyncio.CancelledError:
                raise
            except Exception:  # a bug here must not stop the server: log it, keep serving
                log.exception("scheduler error")

    async def _step(self) -> None:
        while not self.running and not self.waiting:
            self._wake.clear()
            await self._wake.wait()
        joining = self._admit()
        if not joining and not self.running:
            return
        self.running = [*self.running, *joining]
        adapters = [g.seq.adapter for g in self.running]

        def step() -> list[Sequence]:
            if self.before_step is not None:
                self.before_step(adapters)
            return self.batch.step([g.seq for g in joining])

        started = time.perf_counter()
        try:
            await self.batcher.call(step, bounded=False)
        except Exception as exc:  # the step never ran (the worker stopped ...): fail what it carried
            log.warning("generation step failed: %s", exc)
            self.batch.clear()
            for gen in self.running:
                gen.seq.finish_reason, gen.seq.error = "error", exc
        now = time.perf_counter()
        still = []
        for gen in self.running:
            seq = gen.seq
            if gen.first_token_at is None and seq.tokens:
                gen.first_token_at = now
            if seq.piece or seq.done:
                gen._updates.put_nowait((seq.piece, seq.done))
                seq.piece = ""
            if seq.done or seq.cancelled:
                gen.finished_at = now
            else:
                still.append(gen)
        finished = [g for g in self.running if g.finished_at is not None]
        self.running = still
        if not still:  # rows cancelled after this step would otherwise hold their KV cache until the next request
            self.batch.clear()
        if self.on_step is not None:
            self.on_step(self, now - started, finished)
