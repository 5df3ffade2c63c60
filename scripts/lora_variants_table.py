"""Print the LoRA variants table of docs/methods.md: plain LoRA, DoRA, PiSSA, OLoRA and LoRA+ on
the same short SST-2 budget as scripts/method_table.py (MiniLM, 60 steps of 16 sentences, seed 0),
through `deltatune train`: dev accuracy before/after and trainable parameters. Step times come
from benchmarks/dora_step.py, which times the variants interleaved in one process (a run's own
time here would also count the first run's warm-up and, on a shared machine, the neighbours).

    python scripts/lora_variants_table.py [--steps 60]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from method_table import DATA, train_once  # noqa: E402

LORA = {"type": "lora", "r": 8, "alpha": 16, "targets": ["q", "v"]}
LR = 3e-3
#: (row label, method section, extra train keys, learning rate)
VARIANTS = [
    ("LoRA (kaiming init)", LORA, {}, LR),
    ("DoRA", {**LORA, "dora": True}, {}, LR),
    ("PiSSA init", {**LORA, "init": "pissa"}, {}, LR),
    ("OLoRA init", {**LORA, "init": "olora"}, {}, LR),
    ("LoRA+ (ratio 16)", LORA, {"lora_plus_ratio": 16}, LR),
    ("LoRA+ (ratio 16)", LORA, {"lora_plus_ratio": 16}, LR / 10),
]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=60)
    args = p.parse_args()
    if not (DATA / "train.tsv").is_file():
        sys.exit(f"SST-2 not found at {DATA}: the shared data folder is needed for this table")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, (label, method, extra, lr) in enumerate(VARIANTS):
            summary, evals = train_once(method, lr, args.steps, f"{tmp}/{i}", extra)
            rows.append({"variant": label, "lr": lr, "before": evals[0]["accuracy"], "after": evals[-1]["accuracy"],
                         "trainable": summary["trainable_params"]})
            print(json.dumps(rows[-1]), flush=True)
    print("| variant | lr | dev acc. before | dev acc. after | trainable parameters |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['variant']} | {r['lr']:g} | {r['before']:.3f} | {r['after']:.3f} | {r['trainable']:,} |")


if __name__ == "__main__":
    main()
