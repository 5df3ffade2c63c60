"""Adapter loading on the embedded MiniLM (``--model smollm2``: SmolLM2-135M's architecture): a
saved LoRA r=8 (q, v) adapter loaded onto a fresh base (deltatune vs HF peft), into a model that
already holds several adapters (the issue's measure: ``model.load(...)`` timed as a user would),
and hot-swapped from a file. Each figure is a median in milliseconds, by wall clock at torch's
default thread count (the headline) and by one-thread CPU time beside it.
Prints the headline, then one JSON line (also written to benchmarks/results/adapter_load.json).

    python benchmarks/adapter_load.py [--repeats 10] [--held 4] [--model minilm|smollm2] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import ClockMode, each_clock, finish, machine  # noqa: E402
from lora_step import MINILM, WORKLOADS, Workload, adapt, base_model  # noqa: E402

import deltatune as dt  # noqa: E402


def load_times(device: str, repeats: int, now, workload: Workload = MINILM, held: int = 4) -> dict[str, list[float]]:
    """Seconds per load for each case by clock ``now``, ``repeats`` samples each after one dropped
    warm-up round. Fresh-base loads (ours and peft's alternate) run apart from the loads into the
    serving model (which holds ``held`` adapters besides), so that copying a whole base between
    samples does not evict what the serving model keeps hot."""
    import peft

    reference = base_model(device, workload)
    times: dict[str, list[float]] = {"fresh": [], "fresh_peft": [], "into_loaded": [], "swap": []}

    def sample(key: str, fn, keep: bool) -> None:
        if device == "cuda":
            torch.cuda.synchronize()
        start = now()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        if keep:
            times[key].append(now() - start)

    with tempfile.TemporaryDirectory() as ours_dir, tempfile.TemporaryDirectory() as peft_dir:
        adapt(copy.deepcopy(reference), "deltatune", workload=workload).save(ours_dir)
        adapt(copy.deepcopy(reference), "peft", workload=workload).save_pretrained(peft_dir)
        for i in range(repeats + 1):
            ours_base, peft_base = copy.deepcopy(reference), copy.deepcopy(reference)
            sample("fresh", lambda: dt.load(ours_base, ours_dir), keep=i > 0)
            sample("fresh_peft", lambda: peft.PeftModel.from_pretrained(peft_base, peft_dir), keep=i > 0)
        serving = dt.load(reference, ours_dir)
        for j in range(held):
            serving.load(ours_dir, name=f"held{j}")
        for i in range(repeats + 1):
            sample("into_loaded", lambda: serving.load(ours_dir, name="extra"), keep=i > 0)
            serving.remove("extra")
            sample("swap", lambda: serving.hot_swap("default", ours_dir), keep=i > 0)
    return times


def figures(device: str, repeats: int, held: int, workload: Workload, mode: ClockMode) -> dict:
    ms = {k: 1000 * statistics.median(v) for k, v in load_times(device, repeats, mode.now, workload, held).items()}
    return {
        "deltatune_fresh_base_ms": round(ms["fresh"], 2), "peft_fresh_base_ms": round(ms["fresh_peft"], 2),
        "ratio_vs_peft": round(ms["fresh"] / ms["fresh_peft"], 3),
        "deltatune_into_loaded_model_ms": round(ms["into_loaded"], 2), "hot_swap_ms": round(ms["swap"], 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--held", type=int, default=4, help="adapters the serving model holds besides its own")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--model", choices=list(WORKLOADS), default="minilm", help="as for lora_step.py")
    args = parser.parse_args()
    result: dict = {"benchmark": "adapter_load", "model": args.model, "device": args.device,
                    "machine": machine(), "repeats": args.repeats, "held_adapters": args.held + 1}
    workload = WORKLOADS[args.model]
    result.update(each_clock(args.device, lambda mode: figures(args.device, args.repeats, args.held, workload, mode)))
    cpu = result.get("cpu_1thread")
    finish(result, [
        f"adapter load into a model holding {args.held + 1} adapters: {result['deltatune_into_loaded_model_ms']:.2f} ms "
        f"median [wall, {result['machine']['threads']} threads]"
        + (f"; {cpu['deltatune_into_loaded_model_ms']:.2f} ms [1-thread CPU time]" if cpu else "") + " (goal <= 5 ms)",
        f"onto a fresh base: {result['deltatune_fresh_base_ms']:.2f} ms, peft {result['peft_fresh_base_ms']:.2f} ms; "
        f"hot swap {result['hot_swap_ms']:.2f} ms [wall]",
    ])


if __name__ == "__main__":
    main()
