"""Mixed-adapter inference on the embedded MiniLM: a batch of 32 rows spread over 8 LoRA
adapters, vs the same batch through one merged adapter (the floor: no adapter cost at all),
vs HF peft's own ``adapter_names`` path, in one run. Prints a JSON line with the ratios.

    python benchmarks/mixed_batch.py [--rounds 7]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import cpu_clock_note, interleaved_medians, machine, use_cpu_time  # noqa: E402
from lora_step import BATCH, LENGTH, base_model, batch  # noqa: E402

import deltatune as dt  # noqa: E402

ADAPTERS, RANK = 8, 8


def build():
    base = base_model("cpu").eval()
    reference = copy.deepcopy(base)
    ours = dt.attach(base, dt.LoraConfig(r=RANK, alpha=16, targets=["q", "v"], init="random"), name="a0")
    for i in range(1, ADAPTERS):
        ours.add(dt.LoraConfig(r=RANK, alpha=16, targets=["q", "v"], init="random"), name=f"a{i}")
    ours.eval()
    names = [f"a{i % ADAPTERS}" for i in range(BATCH)]  # interleaved rows: the hardest grouping
    inputs = {k: v for k, v in batch("cpu").items() if k != "labels"}
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
    args = parser.parse_args()
    use_cpu_time("cpu")
    reference, ours, names, inputs = build()
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
        with torch.no_grad():
            med = interleaved_medians(calls, rounds=args.rounds)
    print(json.dumps({
        "benchmark": "mixed_batch", "adapters": ADAPTERS, "batch": BATCH, "length": LENGTH, "rank": RANK,
        "machine": machine(), "clock": cpu_clock_note(), "seconds": {k: round(v, 4) for k, v in med.items()},
        "deltatune_mixed_vs_merged": round(med["deltatune_mixed"] / med["merged"], 3),
        "peft_mixed_vs_merged": round(med["peft_mixed"] / med["merged"], 3),
        "deltatune_vs_peft": round(med["deltatune_mixed"] / med["peft_mixed"], 3),
        "max_abs_diff_vs_peft": max_diff,
    }))


if __name__ == "__main__":
    main()
