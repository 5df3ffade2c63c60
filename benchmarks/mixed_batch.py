"""Mixed-adapter inference on the embedded MiniLM: a batch of 32 rows spread over 8 LoRA
adapters (``--model smollm2``: SmolLM2-135M's architecture, 8 rows of 512 tokens, one per
adapter), vs the same batch through one merged adapter (the floor: no adapter cost at all), vs
HF peft's own ``adapter_names`` path, in one run. Prints a JSON line with the ratios.

    python benchmarks/mixed_batch.py [--rounds 7] [--model minilm|smollm2] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import copy
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import each_clock, fastest, finish, interleaved_times, machine  # noqa: E402
from lora_step import WORKLOADS, Workload, base_model, batch  # noqa: E402

import deltatune as dt  # noqa: E402

ADAPTERS, RANK = 8, 8


def build(device: str, workload: Workload):
    base = base_model(device, workload).eval()
    reference = copy.deepcopy(base)
    ours = dt.attach(base, dt.LoraConfig(r=RANK, alpha=16, targets=["q", "v"], init="random"), name="a0")
    for i in range(1, ADAPTERS):
        ours.add(dt.LoraConfig(r=RANK, alpha=16, targets=["q", "v"], init="random"), name=f"a{i}")
    ours.eval()
    names = [f"a{i % ADAPTERS}" for i in range(workload.batch)]  # interleaved rows: the hardest grouping
    inputs = {k: v for k, v in batch(device, workload).items() if k != "labels"}
    return reference, ours, names, inputs


def peft_model(reference, ours, folder: str):
    import peft
    for i in range(ADAPTERS):
        ours.save(os.path.join(folder, f"a{i}"), adapter=f"a{i}")
    model = peft.PeftModel.from_pretrained(copy.deepcopy(reference), os.path.join(folder, "a0"), adapter_name="a0")
    for i in range(1, ADAPTERS):
        model.load_adapter(os.path.join(folder, f"a{i}"), adapter_name=f"a{i}")
    return model.eval()


def main() -> None:
    import tempfile

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--model", choices=list(WORKLOADS), default="minilm", help="as for lora_step.py")
    args = parser.parse_args()
    workload = WORKLOADS[args.model]
    reference, ours, names, inputs = build(args.device, workload)
    merged = copy.deepcopy(ours)
    merged.use("a0")
    merged.merge()
    with tempfile.TemporaryDirectory() as folder:
        theirs = peft_model(reference, ours, folder)
        with torch.no_grad():
            expected = theirs(**inputs, adapter_names=names).logits
            got = ours(**inputs, adapter_names=names).logits
        max_diff = float((expected - got).abs().max())
        calls = {
            "merged": lambda: merged(**inputs),
            "deltatune_mixed": lambda: ours(**inputs, adapter_names=names),
            "peft_mixed": lambda: theirs(**inputs, adapter_names=names),
        }
        def measure(mode) -> dict:
            with torch.no_grad():
                best = fastest(interleaved_times(calls, rounds=args.rounds, warmup=2, device=args.device, now=mode.now))
            return {"seconds": {k: round(v, 4) for k, v in best.items()},
                    "deltatune_mixed_vs_merged": round(best["deltatune_mixed"] / best["merged"], 3),
                    "peft_mixed_vs_merged": round(best["peft_mixed"] / best["merged"], 3),
                    "deltatune_vs_peft": round(best["deltatune_mixed"] / best["peft_mixed"], 3)}

        figures = each_clock(args.device, measure)
    result = {"benchmark": "mixed_batch", "model": workload.name, "adapters": ADAPTERS, "batch": workload.batch,
              "length": workload.length, "rank": RANK, "device": args.device, "machine": machine(), **figures,
              "max_abs_diff_vs_peft": max_diff}
    cpu = figures.get("cpu_1thread")
    finish(result, [f"mixed batch of {ADAPTERS} adapters / merged: {figures['deltatune_mixed_vs_merged']:.3f} (peft "
                    f"{figures['peft_mixed_vs_merged']:.3f}) [wall, {result['machine']['threads']} threads]"
                    + (f"; {cpu['deltatune_mixed_vs_merged']:.3f} [1-thread CPU time]" if cpu else "")])


if __name__ == "__main__":
    main()
