"""``train.compile: true`` measured: one LoRA training step eager vs through ``torch.compile``.

Same step as lora_step.py (MiniLM, batch 32 x 128, LoRA r=8 on q and v, AdamW, fp32; bf16
autocast too where the hardware has it natively), timed interleaved in one process after the
compiled model's first steps (which compile). Prints one JSON line with the ratio and the time
the compilation took (wall clock; a warm inductor cache makes later runs much faster).

    python benchmarks/compile_step.py [--rounds 3] [--model minilm|smollm2] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import each_clock, fastest, finish, interleaved_times, step_benchmark  # noqa: E402
from lora_step import WORKLOADS, Workload, adapt, base_model, batch, make_step  # noqa: E402


def compare(device: str, precision: str, rounds: int, workload: Workload) -> dict:
    data = batch(device, workload)
    model = adapt(base_model(device, workload), "deltatune", workload=workload)
    eager = make_step(model, data, device, precision)
    compiled = make_step(torch.compile(model), data, device, precision)
    start = time.perf_counter()
    compiled()  # the first call compiles forward and backward
    compile_s = time.perf_counter() - start

    def measure(mode) -> dict:
        best = fastest(interleaved_times({"eager": eager, "compiled": compiled}, rounds=rounds, device=device,
                                         now=mode.now))
        return {"eager_s": round(best["eager"], 4), "compiled_s": round(best["compiled"], 4),
                "compiled_vs_eager": round(best["compiled"] / best["eager"], 3)}

    return {**each_clock(device, measure), "first_call_wall_s": round(compile_s, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--model", choices=list(WORKLOADS), default="minilm", help="as for lora_step.py")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    result, precisions = step_benchmark("compile_step", args.device, model=args.model)
    for precision in precisions:
        result[precision] = compare(args.device, precision, args.rounds, WORKLOADS[args.model])
    finish(result, [f"compile_step {p}: compiled / eager {result[p]['compiled_vs_eager']:.3f} [wall]"
                    + (f", {result[p]['cpu_1thread']['compiled_vs_eager']:.3f} [1-thread CPU time]"
                       if "cpu_1thread" in result[p] else "") for p in precisions])


if __name__ == "__main__":
    main()
