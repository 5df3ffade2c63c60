"""The batcher on its own, with a recording stand-in for the model: which requests share a batch,
that every answer goes back to its own request, limits, failures, and calls between batches."""

from __future__ import annotations

import asyncio
import threading

import pytest

from deltatune.serve.batcher import Batcher
from deltatune.serve.errors import QueueFull, RequestError
from tests.serve.conftest import run


class Recorder:
    """Answers each row with ``(key, row)``; remembers every batch and call in order."""

    def __init__(self, fail_key: str | None = None, crash: bool = False) -> None:
        self.events: list = []
        self.fail_key, self.crash = fail_key, crash

    def __call__(self, requests):
        self.events.append(("batch", [(k, list(rows)) for k, rows in requests]))
        if self.crash:
            raise RuntimeError("model exploded")
        return [ValueError(f"bad {k}") if k == self.fail_key else [(k, r) for r in rows] for k, rows in requests]

    def batches(self):
        return [e[1] for e in self.events if e[0] == "batch"]


async def started(recorder, **kwargs) -> Batcher:
    batcher = Batcher(recorder, **kwargs)
    await batcher.start()
    return batcher


def test_concurrent_requests_for_different_adapters_share_one_batch_and_get_their_own_rows():
    async def main():
        rec = Recorder()
        batcher = await started(rec, max_batch=12, max_wait_ms=10_000)  # closes only when full
        requests = [(f"k{i % 4}", [f"r{i}-{j}" for j in range(1 + i % 3)]) for i in range(6)]  # 12 rows
        results = await asyncio.gather(*(batcher.submit(k, rows) for k, rows in requests))
        await batcher.stop()
        return rec, requests, results

    rec, requests, results = run(main())
    assert len(rec.batches()) == 1 and len({k for k, _ in rec.batches()[0]}) == 4
    for (key, rows), result in zip(requests, results):
        assert result == [(key, r) for r in rows]


def test_batches_hold_at_most_max_batch_rows_in_arrival_order():
    async def main():
        rec = Recorder()
        batcher = await started(rec, max_batch=4, max_wait_ms=0)
        gate = threading.Event()
        blocker = asyncio.ensure_future(batcher.call(gate.wait, bounded=False))  # hold the worker
        await asyncio.sleep(0)
        tasks = [asyncio.ensure_future(batcher.submit(f"k{i}", ["x", "y"])) for i in range(5)]
        big = asyncio.ensure_future(batcher.submit("big", list("abcdef")))
        await asyncio.sleep(0)
        gate.set()
        await asyncio.gather(blocker, *tasks, big)
        await batcher.stop()
        return rec

    rec = run(main())
    assert [[k for k, _ in b] for b in rec.batches()] == [["k0", "k1"], ["k2", "k3"], ["k4"], ["big"]]


def test_full_queue_refuses_at_once_but_admin_calls_still_queue():
    async def main():
        rec = Recorder()
        batcher = await started(rec, max_batch=8, max_wait_ms=0, queue_size=2)
        gate = threading.Event()
        blocker = asyncio.ensure_future(batcher.call(gate.wait, bounded=False))
        await asyncio.sleep(0)
        waiting = [asyncio.ensure_future(batcher.submit("a", [i])) for i in range(2)]
        await asyncio.sleep(0)
        with pytest.raises(QueueFull) as info:
            await batcher.submit("a", [99])
        assert info.value.status == 429
        admin = asyncio.ensure_future(batcher.call(lambda: "done", bounded=False))
        await asyncio.sleep(0)
        assert batcher.depth == 3
        gate.set()
        results = await asyncio.gather(*waiting)
        assert await admin == "done"
        await batcher.submit("a", [7])  # room again
        await blocker
        await batcher.stop()
        return results

    assert run(main()) == [[("a", 0)], [("a", 1)]]


def test_one_failing_request_fails_alone_and_a_crashing_batch_does_not_stop_the_worker():
    async def main():
        rec = Recorder(fail_key="bad")
        batcher = await started(rec, max_batch=3, max_wait_ms=10_000)
        ok, bad, ok2 = await asyncio.gather(batcher.submit("a", [1]), batcher.submit("bad", [2]),
                                            batcher.submit("b", [3]), return_exceptions=True)
        assert ok == [("a", 1)] and ok2 == [("b", 3)] and isinstance(bad, ValueError)
        rec.crash = True
        crashed = await asyncio.gather(*(batcher.submit("a", [i]) for i in range(3)), return_exceptions=True)
        assert all(isinstance(e, RuntimeError) for e in crashed)
        rec.crash = False
        assert await asyncio.gather(*(batcher.submit("c", [i]) for i in range(3))) == [[("c", i)] for i in range(3)]
        await batcher.stop()

    run(main())


def test_calls_run_alone_between_batches_in_queue_order():
    async def main():
        rec = Recorder()
        batcher = await started(rec, max_batch=2, max_wait_ms=10_000)  # batches close when full
        gate = threading.Event()
        blocker = asyncio.ensure_future(batcher.call(gate.wait, bounded=False))
        await asyncio.sleep(0)
        first = [asyncio.ensure_future(batcher.submit("a", [i])) for i in range(2)]
        mutate = asyncio.ensure_future(batcher.call(lambda: rec.events.append(("call",)), bounded=False))
        later = [asyncio.ensure_future(batcher.submit("b", [i])) for i in range(2)]
        await asyncio.sleep(0)
        gate.set()
        await asyncio.gather(blocker, *first, mutate, *later)
        await batcher.stop()
        return rec

    rec = run(main())
    assert rec.events == [("batch", [("a", [0]), ("a", [1])]), ("call",), ("batch", [("b", [0]), ("b", [1])])]


def test_cancelled_requests_are_skipped_and_stop_answers_the_rest_with_503():
    async def main():
        rec = Recorder()
        batcher = await started(rec, max_batch=8, max_wait_ms=0)
        gate = threading.Event()
        blocker = asyncio.ensure_future(batcher.call(gate.wait, bounded=False))
        await asyncio.sleep(0)
        gone = asyncio.ensure_future(batcher.submit("gone", [0]))
        kept = asyncio.ensure_future(batcher.submit("kept", [1]))
        await asyncio.sleep(0)
        gone.cancel()
        gate.set()
        assert await kept == [("kept", 1)]
        await blocker
        assert all(k != "gone" for b in rec.batches() for k, _ in b)
        gate.clear()
        in_flight = asyncio.ensure_future(batcher.call(gate.wait, bounded=False))
        stranded = asyncio.ensure_future(batcher.submit("late", [2]))
        await asyncio.sleep(0)
        threading.Timer(0.1, gate.set).start()  # stop() waits for the model thread to finish its call
        await batcher.stop()
        for future in (in_flight, stranded):
            with pytest.raises(RequestError) as info:
                await future
            assert info.value.status == 503
        with pytest.raises(RequestError):
            await batcher.submit("after", [3])

    run(main())


def test_stop_waits_for_the_batch_in_flight_without_blocking_the_event_loop():
    async def main():
        batcher = await started(Recorder(), max_batch=4, max_wait_ms=0)
        gate, inside = threading.Event(), threading.Event()

        def slow():
            inside.set()
            gate.wait(5)
            return "done"

        call = asyncio.ensure_future(batcher.call(slow, bounded=False))
        while not inside.is_set():  # the model thread is now busy with the call
            await asyncio.sleep(0.001)
        stopping = asyncio.ensure_future(batcher.stop())
        await asyncio.sleep(0.05)
        # the loop still runs while stop() waits: this coroutine got here, and it lets the call end
        assert not stopping.done()
        gate.set()
        await stopping
        return await asyncio.gather(call, return_exceptions=True)

    (result,) = run(main())
    assert result == "done" or isinstance(result, RequestError)
