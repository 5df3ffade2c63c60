"""One DoRA (and PiSSA) training step against plain LoRA, deltatune and HF peft side by side.

The same workload as lora_step.py (the embedded MiniLM, batch 32 x 128, r=8 on q and v, AdamW;
``--model smollm2`` for the CUDA column), four variants timed interleaved in one process, each
variant's fastest round (common.fastest says why): deltatune's LoRA, DoRA and PiSSA-initialised
LoRA, peft's LoRA and DoRA. Prints one JSON line with DoRA's extra cost over LoRA in each
library, deltatune's DoRA step against peft's (below 1: faster), and PiSSA's step over LoRA's
(deltatune keeps the frozen start as a second rank-r term; OLoRA costs the same, LoRA+ nothing).

    python benchmarks/dora_step.py [--model minilm|smollm2] [--rounds 5] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import fastest, interleaved_times, medians, step_benchmark  # noqa: E402
from lora_step import ALPHA, RANK, WORKLOADS, Workload, base_model, batch, make_step  # noqa: E402

import deltatune as dt  # noqa: E402

VARIANTS = ("deltatune-lora", "deltatune-dora", "deltatune-pissa", "peft-lora", "peft-dora")


def adapt(base: torch.nn.Module, variant: str, workload: Workload) -> torch.nn.Module:
    dora = variant.endswith("dora")
    if variant.startswith("deltatune"):
        init = "pissa" if variant.endswith("pissa") else "kaiming"
        return dt.attach(base, dt.LoraConfig(r=RANK, alpha=ALPHA, targets=["q", "v"], dora=dora, init=init))
    import peft
    return peft.get_peft_model(base, peft.LoraConfig(r=RANK, lora_alpha=ALPHA, task_type=workload.task_type,
                                                     target_modules=list(workload.peft_lora_targets), use_dora=dora))


def time_steps(device: str, precision: str, rounds: int, workload: Workload) -> dict:
    data = batch(device, workload)
    steps = {v: make_step(adapt(base_model(device, workload), v, workload), data, device, precision)
             for v in VARIANTS}
    times = interleaved_times(steps, rounds=rounds, device=device)
    best = fastest(times)
    return {
        "seconds_fastest": {k: round(v, 4) for k, v in best.items()},
        "seconds_median": {k: round(v, 4) for k, v in medians(times).items()},
        "dora_over_lora_deltatune": round(best["deltatune-dora"] / best["deltatune-lora"], 3),
        "dora_over_lora_peft": round(best["peft-dora"] / best["peft-lora"], 3),
        "deltatune_dora_over_peft_dora": round(best["deltatune-dora"] / best["peft-dora"], 3),
        "pissa_over_lora_deltatune": round(best["deltatune-pissa"] / best["deltatune-lora"], 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(WORKLOADS), default="minilm")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    workload = WORKLOADS[args.model]
    result, precisions = step_benchmark("dora_step", args.device, model=workload.name, batch=workload.batch,
                                        length=workload.length, rank=RANK, targets="q,v")
    for precision in precisions:
        result[precision] = time_steps(args.device, precision, args.rounds, workload)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
