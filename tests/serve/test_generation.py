"""Continuous batching across adapters: every request in a busy mixed batch, joining mid-way, gets
the tokens it gets alone (greedy, fp32); sampling and stop strings per request; bounds and
cancellation in the scheduler."""

from __future__ import annotations

import asyncio
import random
import time

import pytest
import torch

import deltatune as dt
from deltatune.serve.batcher import Batcher
from deltatune.serve.errors import RequestError
from deltatune.serve.running_batch import RunningBatch, Sequence
from deltatune.serve.sampling import SamplingParams, TextStream, TokenChooser
from deltatune.serve.scheduler import Scheduler
from tests.serve.generation_fixtures import LLAMA_ADAPTERS, chat_tokenizer, greedy_alone, llama_root, llama_with  # noqa: F401

PROMPTS = ["hello there", "the cat sat on the mat and then it", "a", "why is the sky blue? because of the",
           "one two three four five six seven eight nine", "it was a dark and stormy"]
NAMES = [*LLAMA_ADAPTERS, dt.BASE_ADAPTER]


@pytest.fixture(scope="module")
def llama(llama_root):
    return llama_with(llama_root)


def running_batch(model) -> RunningBatch:
    return RunningBatch(model, pad_id=0, eos_ids=set(), device=torch.device("cpu"),
                        autocast=lambda: torch.autocast("cpu", enabled=False))


def sequence(tokenizer, adapter: str, prompt: str, **params) -> Sequence:
    params = SamplingParams(**params)
    return Sequence(adapter, tokenizer(prompt)["input_ids"], params, TextStream(tokenizer, params.stop))


def test_busy_mixed_batch_with_joins_equals_each_request_alone(llama, chat_tokenizer):
    rng = random.Random(0)
    seqs = [sequence(chat_tokenizer, NAMES[i % len(NAMES)], PROMPTS[i % len(PROMPTS)], max_tokens=rng.randint(3, 24))
            for i in range(14)]
    joins = {0: seqs[:4], 1: seqs[4:5], 3: seqs[5:8], 6: seqs[8:9], 10: seqs[9:13], 11: seqs[13:]}
    batch = running_batch(llama)
    widths = []
    for step in range(60):
        batch.step(joins.get(step, []))
        widths.append(len(batch.rows))
    assert max(widths) >= 8 and widths[-1] == 0  # it was busy, and everyone left when done
    adapters_together = {s.adapter for s in seqs[:9]}
    assert len(adapters_together) == len(NAMES)
    for seq in seqs:
        assert seq.finish_reason == "length" and seq.error is None
        assert seq.tokens == greedy_alone(llama, seq.adapter, seq.prompt, seq.params.max_tokens), seq.adapter
    # and the adapters matter: the same prompt gives different tokens through different adapters
    outs = {tuple(greedy_alone(llama, n, seqs[0].prompt, 12)) for n in NAMES}
    assert len(outs) == len(NAMES)


def test_same_seed_same_tokens_whatever_the_batch(llama, chat_tokenizer):
    def run(company: int) -> list[int]:
        batch = running_batch(llama)
        target = sequence(chat_tokenizer, "l1", PROMPTS[1], max_tokens=12, temperature=0.9, top_p=0.95, seed=7)
        others = [sequence(chat_tokenizer, NAMES[i % 5], PROMPTS[i % 6], max_tokens=12, temperature=1.0)
                  for i in range(company)]
        batch.step([*others, target])
        while batch.rows:
            batch.step([])
        return target.tokens

    first = run(0)
    assert run(5) == first
    other_seed = sequence(chat_tokenizer, "l1", PROMPTS[1], max_tokens=12, temperature=0.9, top_p=0.95, seed=8)
    batch = running_batch(llama)
    batch.step([other_seed])
    while batch.rows:
        batch.step([])
    assert other_seed.tokens != first


def test_token_chooser_against_hand_computed_sets():
    logits = torch.tensor([4.0, 3.0, 2.0, 1.0, 0.0, -1.0])
    assert TokenChooser(SamplingParams(temperature=0)).choose(logits) == 0
    assert TokenChooser(SamplingParams(temperature=1.0, top_k=1, seed=1)).choose(logits) == 0
    probs = torch.softmax(logits, dim=0)  # 0.64, 0.23, 0.087, ...: top_p=0.8 keeps exactly tokens 0 and 1
    assert probs[0] < 0.8 <= probs[0] + probs[1]
    chooser = TokenChooser(SamplingParams(temperature=1.0, top_p=0.8, seed=3))
    picks = {chooser.choose(logits) for _ in range(300)}
    assert picks == {0, 1}
    chooser = TokenChooser(SamplingParams(temperature=1.0, top_k=3, seed=3))
    assert {chooser.choose(logits) for _ in range(300)} == {0, 1, 2}
    with pytest.raises(dt.ConfigError, match="top_p"):
        SamplingParams(top_p=0)


def test_text_stream_stops_before_the_stop_string_and_holds_back_its_start(chat_tokenizer):
    ids = chat_tokenizer("the cat sat on the mat", add_special_tokens=False)["input_ids"]
    stream = TextStream(chat_tokenizer, stop=("on the",))
    released = [stream.push(t) for t in ids]
    assert "".join(released) == "the cat sat "
    assert stream.stopped
    assert released[3] == " "  # "on" might start "on the": held back until the next token decides
    plain = TextStream(chat_tokenizer)
    assert "".join(plain.push(t) for t in ids) + plain.finish() == "the cat sat on the mat"


def test_eos_ends_a_sequence_and_is_not_shown(llama, chat_tokenizer):
    seq = sequence(chat_tokenizer, "l2", PROMPTS[0], max_tokens=10)
    expected = greedy_alone(llama, "l2", seq.prompt, 10)
    batch = RunningBatch(llama, pad_id=0, eos_ids={expected[3]}, device=torch.device("cpu"),
                         autocast=lambda: torch.autocast("cpu", enabled=False))
    batch.step([seq])
    while batch.rows:
        batch.step([])
    assert seq.finish_reason == "stop"
    assert seq.tokens == expected[:expected.index(expected[3]) + 1]


def test_scheduler_bounds_running_sequences_and_frees_cancelled_slots(llama, chat_tokenizer):
    async def main():
        batcher = Batcher(lambda requests: [], max_batch=1)
        await batcher.start()
        widths = []
        scheduler = Scheduler(running_batch(llama), batcher, max_running=3,
                              on_step=lambda s, seconds, finished: widths.append(len(s.running)))
        await scheduler.start()
        try:
            seqs = [sequence(chat_tokenizer, NAMES[i % 5], PROMPTS[i % 6], max_tokens=6 + i) for i in range(7)]
            gens = [scheduler.submit(s) for s in seqs]
            texts = await asyncio.gather(*(g.text() for g in gens))
            assert max(widths) == 3  # never more than max_running, and it did fill up
            for seq, text in zip(seqs, texts):
                assert seq.tokens == greedy_alone(llama, seq.adapter, seq.prompt, seq.params.max_tokens)
                assert text == chat_tokenizer.decode(seq.tokens, skip_special_tokens=True)
            long = scheduler.submit(sequence(chat_tokenizer, "l0", PROMPTS[0], max_tokens=900))
            pieces = long.pieces()
            await pieces.__anext__()
            await pieces.aclose()  # the client went away
            for _ in range(3000):  # a few steps at most; generous for a busy machine
                if not scheduler.running and not scheduler.batch.rows:
                    break
                await asyncio.sleep(0.01)
            assert not scheduler.running and not scheduler.batch.rows
            assert len(long.seq.tokens) < 900
        finally:
            await scheduler.stop()
            await batcher.stop()

    asyncio.run(main())


def test_a_request_that_cannot_join_before_the_deadline_gets_503_while_the_running_one_finishes(llama, chat_tokenizer):
    async def main():
        batcher = Batcher(lambda requests: [], max_batch=1)
        await batcher.start()
        scheduler = Scheduler(running_batch(llama), batcher, max_running=1, max_queue_ms=30)
        await scheduler.start()
        try:
            running = scheduler.submit(sequence(chat_tokenizer, "l0", PROMPTS[1], max_tokens=400))
            pieces = running.pieces()
            await pieces.__anext__()  # it holds the only slot now
            late = scheduler.submit(sequence(chat_tokenizer, "l1", PROMPTS[0], max_tokens=4))
            with pytest.raises(RequestError) as refused:
                await late.text()
            assert refused.value.status == 503 and refused.value.retry_after >= 1
            assert "--max-queue-ms" in refused.value.detail and not late.seq.tokens
            assert time.perf_counter() - late.arrived >= 0.03
            rest = "".join([piece async for piece in pieces])
            assert running.seq.error is None and running.seq.finish_reason == "length" and rest
        finally:
            await scheduler.stop()
            await batcher.stop()

    asyncio.run(main())


def test_a_request_whose_adapter_is_unloaded_mid_way_fails_alone(llama_root, chat_tokenizer):
    model = llama_with(llama_root, ["l0", "l1"])
    batch = running_batch(model)
    doomed, fine = (sequence(chat_tokenizer, n, PROMPTS[0], max_tokens=8) for n in ("l0", "l1"))
    batch.step([doomed, fine])
    model.remove("l0")
    while batch.rows:
        batch.step([])
    assert isinstance(doomed.error, RequestError) and doomed.error.status == 404
    assert fine.tokens == greedy_alone(model, "l1", fine.prompt, 8)
