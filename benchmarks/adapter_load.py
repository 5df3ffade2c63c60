"""Adapter loading on the embedded MiniLM (``--model smollm2``: SmolLM2-135M's architecture): a
saved LoRA r=8 (q, v) adapter loaded onto a fresh base (deltatune vs HF peft), into a model that
already serves one, and hot-swapped from a file.
Prints one JSON line with the medians in milliseconds and the ratio against peft.

    python benchmarks/adapter_load.py [--repeats 20] [--model minilm|smollm2] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import clock, cpu_clock_note, machine, use_cpu_time  # noqa: E402
from lora_step import MINILM, WORKLOADS, Workload, adapt, base_model  # noqa: E402

import deltatune as dt  # noqa: E402


def load_times(device: str, repeats: int, workload: Workload = MINILM) -> dict[str, list[float]]:
    """Seconds per load for each case, ``repeats`` samples each after one dropped warm-up round.
    Fresh-base loads (ours and peft's alternate) run apart from the loads into the serving model,
    so that copying a whole base between samples does not evict what the serving model keeps hot."""
    import peft

    now = clock(device)
    reference = base_model(device, workload)
    times: dict[str, list[float]] = {"fresh": [], "fresh_peft": [], "into_loaded": [], "swap": []}

    def sample(key: str, fn, keep: bool) -> None:
        start = now()
        fn()
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
        for i in range(repeats + 1):
            sample("into_loaded", lambda: serving.load(ours_dir, name="extra"), keep=i > 0)
            serving.remove("extra")
            sample("swap", lambda: serving.hot_swap("default", ours_dir), keep=i > 0)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--model", choices=list(WORKLOADS), default="minilm", help="as for lora_step.py")
    args = parser.parse_args()
    result: dict = {"benchmark": "adapter_load", "model": args.model, "device": args.device,
                    "machine": machine(), "repeats": args.repeats}
    if use_cpu_time(args.device):
        result["clock"] = cpu_clock_note()
    times = load_times(args.device, args.repeats, WORKLOADS[args.model])
    ms = {k: 1000 * statistics.median(v) for k, v in times.items()}
    result.update({
        "deltatune_fresh_base_ms": round(ms["fresh"], 2), "peft_fresh_base_ms": round(ms["fresh_peft"], 2),
        "ratio_vs_peft": round(ms["fresh"] / ms["fresh_peft"], 3),
        "deltatune_into_loaded_model_ms": round(ms["into_loaded"], 2), "hot_swap_ms": round(ms["swap"], 2),
    })
    print(json.dumps(result))


if __name__ == "__main__":
    main()
