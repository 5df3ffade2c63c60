"""Generation throughput with continuous batching across adapters, against one request at a time.

The embedded SmolLM2-135M (CPU, fp32) with 8 random LoRA adapters (r=8 on q, v). 32 concurrent
requests of 64 new tokens (greedy), each naming one of the 8 adapters or the base, go to the
server's generation scheduler (the code behind ``/v1/completions``, without HTTP). Two references
in the same run: the same requests served one at a time as ``/v1/generate`` does
(``Engine.generate``; timed on the first ``--sequential`` of them, a rate), and all 32 on one
adapter through the scheduler. Reports aggregate new tokens per second of each, the ratios
(goals: >= 3x one-at-a-time, >= 0.85x one adapter) and p50 / p99 time to first token, and checks
that the batched tokens equal the one-at-a-time tokens.

Throughput is counted per second of the process's CPU time with one torch thread (as the step
benchmarks do), so other work on a shared machine does not count; the batched runs alternate
over ``--rounds`` and each keeps its best round. Wall-clock figures are reported beside them.

    python benchmarks/generate_load.py [--requests 32] [--tokens 64] [--sequential 8] [--rounds 2]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import machine  # noqa: E402

import torch  # noqa: E402
import transformers  # noqa: E402

import deltatune as dt  # noqa: E402
from deltatune.serve.batcher import Batcher  # noqa: E402
from deltatune.serve.engine import Engine  # noqa: E402
from deltatune.serve.generation import GenerationService  # noqa: E402
from deltatune.serve.metrics import percentiles  # noqa: E402
from deltatune.serve.sampling import SamplingParams  # noqa: E402
from deltatune.serve.settings import ServeSettings  # noqa: E402

transformers.logging.set_verbosity_error()

PROMPTS = [
    "Write a short story about a robot who learns to paint.", "The three most important rules of cooking are",
    "Explain photosynthesis to a ten-year-old.", "Once upon a time, in a city under the sea,",
    "List some good names for a small grey cat:", "The main causes of the French Revolution were",
    "How do I sort a list in Python?", "Dear hiring manager, I am writing to apply for",
]


def build(adapters: int):
    model = dt.AdaptedModel(dt.load_model("smollm2", auto_class="AutoModelForCausalLM", quiet=True))
    for i in range(adapters):
        torch.manual_seed(2000 + i)
        model.add(dt.LoraConfig(r=8, alpha=16, targets=["q", "v"], init="random"), f"a{i}", trainable=False)
    return model.eval(), dt.load_tokenizer("smollm2")


async def batched(engine: Engine, jobs: list[tuple[str, str]], tokens: int) -> dict:
    """All ``jobs`` submitted at once to the scheduler: tokens/s, time to first token, the tokens."""
    batcher = Batcher(engine.classify)
    await batcher.start()
    service = GenerationService(engine, batcher, ServeSettings(precision="fp32", max_running=len(jobs)), None)
    await service.start()
    try:
        start, cpu = time.perf_counter(), time.process_time()
        gens = [service.submit(name, service.encode(prompt), SamplingParams(max_tokens=tokens)) for name, prompt in jobs]
        await asyncio.gather(*(g.text() for g in gens))
        took, cpu = time.perf_counter() - start, time.process_time() - cpu
    finally:
        await service.stop()
        await batcher.stop()
    made = sum(len(g.seq.tokens) for g in gens)
    ttft = [g.first_token_at - g.arrived for g in gens]
    return {"tokens_per_s": made / cpu, "wall_tokens_per_s": made / took, "seconds": took, "new_tokens": made,
            "ttft_s": {k: round(v, 3) for k, v in percentiles(ttft, (50, 99)).items()},
            "tokens": [g.seq.tokens for g in gens]}


def sequential(engine: Engine, jobs: list[tuple[str, str]], tokens: int) -> dict:
    """Each job alone, one after another, as ``/v1/generate`` serves them."""
    start, cpu = time.perf_counter(), time.process_time()
    outs = [engine.generate(name, prompt, tokens)["tokens"] for name, prompt in jobs]
    took, cpu = time.perf_counter() - start, time.process_time() - cpu
    made = sum(map(len, outs))
    return {"tokens_per_s": made / cpu, "wall_tokens_per_s": made / took, "seconds": took, "tokens": outs}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--adapters", type=int, default=8)
    p.add_argument("--sequential", type=int, default=8, help="requests timed one at a time (a rate)")
    p.add_argument("--rounds", type=int, default=2, help="alternating rounds of the batched runs")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: steadier on a shared machine)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model, tokenizer = build(args.adapters)
    engine = Engine(model, tokenizer, precision="fp32", max_length=1024)
    names = [*(f"a{i}" for i in range(args.adapters)), dt.BASE_ADAPTER]
    rng = random.Random(0)
    mixed_jobs = [(names[i % len(names)], rng.choice(PROMPTS)) for i in range(args.requests)]
    one_jobs = [("a0", prompt) for _, prompt in mixed_jobs]

    asyncio.run(batched(engine, mixed_jobs[:4], 4))  # warm-up
    runs: dict[str, list[dict]] = {"mixed": [], "one": []}
    for _ in range(args.rounds):
        runs["mixed"].append(asyncio.run(batched(engine, mixed_jobs, args.tokens)))
        runs["one"].append(asyncio.run(batched(engine, one_jobs, args.tokens)))
    mixed, one = (max(runs[k], key=lambda r: r["tokens_per_s"]) for k in ("mixed", "one"))
    alone = sequential(engine, mixed_jobs[:args.sequential], args.tokens)
    exact = sum(a == b for a, b in zip(alone["tokens"], mixed["tokens"]))
    report = {
        "model": "smollm2 (fp32, CPU)", "requests": args.requests, "new_tokens_each": args.tokens,
        "adapters": args.adapters, "threads": args.threads,
        "mixed_tokens_per_s": round(mixed["tokens_per_s"], 2),
        "one_adapter_tokens_per_s": round(one["tokens_per_s"], 2),
        "one_at_a_time_tokens_per_s": round(alone["tokens_per_s"], 2),
        "mixed_vs_one_at_a_time": round(mixed["tokens_per_s"] / alone["tokens_per_s"], 3),
        "mixed_vs_one_adapter": round(mixed["tokens_per_s"] / one["tokens_per_s"], 3),
        "ttft_p50_s": mixed["ttft_s"].get("p50"), "ttft_p99_s": mixed["ttft_s"].get("p99"),
        "one_adapter_ttft_s": one["ttft_s"],
        "greedy_equal_to_alone": f"{exact}/{len(alone['tokens'])}",
        "wall_tokens_per_s": {"mixed": round(mixed["wall_tokens_per_s"], 2), "one_adapter": round(one["wall_tokens_per_s"], 2),
                              "one_at_a_time": round(alone["wall_tokens_per_s"], 2)},
        "rounds_tokens_per_s": {k: [round(r["tokens_per_s"], 2) for r in v] for k, v in runs.items()},
        "seconds": {"mixed": round(mixed["seconds"], 1), "one_adapter": round(one["seconds"], 1),
                    "one_at_a_time": round(alone["seconds"], 1)},
        "machine": machine(),
    }
    print(json.dumps(report))


if __name__ == "__main__":
    main()
