"""Write docs/methods.md: every method fine-tunes the embedded MiniLM on the same small SST-2
budget through `deltatune train`, and the table shows dev accuracy before/after, trainable
parameters and wall time.

    python scripts/method_table.py [--steps 60] [--out docs/methods.md]

The data is ../shared/data/sst2 (read in place). Learning rates are each method's usual range
for a short run; nothing is tuned per row beyond that.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "sst2"

#: (row label, method section, learning rate)
METHODS = [
    ("LoRA r=8 on q,v", {"type": "lora", "r": 8, "alpha": 16, "targets": ["q", "v"]}, 3e-3),
    ("IA3 (k, v, FFN)", {"type": "ia3"}, 3e-2),
    ("Adapters, Pfeiffer, reduction 16", {"type": "adapters", "style": "pfeiffer", "reduction_factor": 16}, 3e-3),
    ("Adapters, Houlsby, reduction 16", {"type": "adapters", "style": "houlsby", "reduction_factor": 16}, 3e-3),
    ("Compacter", {"type": "compacter"}, 3e-3),
    ("Prompt tuning, 20 tokens", {"type": "prompt", "num_virtual_tokens": 20}, 3e-2),
    ("P-tuning, 20 tokens (MLP)", {"type": "p_tuning", "num_virtual_tokens": 20}, 3e-3),
    ("Prefix tuning, 10 tokens", {"type": "prefix", "num_virtual_tokens": 10}, 1e-2),
    ("BitFit", {"type": "bitfit"}, 3e-3),
    ("Diff pruning (q, v)", {"type": "diff_pruning", "targets": ["q", "v"]}, 1e-3),
    ("Freeze: top block + head", {"type": "freeze", "train": "upper:1"}, 1e-4),
    ("Head only (baseline)", {"type": "head-only"}, 1e-3),
    ("Full fine-tuning (baseline)", {"type": "full"}, 5e-5),
]


def recipe(method: dict, lr: float, steps: int, out: str) -> dict:
    return {
        "model": "minilm", "task": "seq-cls",
        "data": {"train": str(DATA / "train.tsv"), "eval": str(DATA / "dev.tsv"), "text": "sentence",
                 "label": "label", "max_length": 64, "max_train": 960, "max_eval": 200},
        "method": method,
        "train": {"epochs": 10, "max_steps": steps, "batch_size": 16, "lr": lr, "schedule": "constant",
                  "warmup": 0, "eval_every": None, "seed": 0, "threads": 1, "restore_best": False},
        "output_dir": out,
    }


def train_once(method: dict, lr: float, steps: int, out: str, train_keys: dict | None = None) -> tuple[dict, list]:
    """Train one recipe into ``out``: ``(summary, eval records)``."""
    from deltatune.train.callbacks import read_records
    from deltatune.train.run import train

    data = recipe(method, lr, steps, out)
    data["train"].update(train_keys or {})
    summary = train(data, quiet=True)
    return summary, [r for r in read_records(Path(out) / "metrics.jsonl") if r.get("kind") == "eval"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--out", default="docs/methods.md")
    args = p.parse_args()
    if not (DATA / "train.tsv").is_file():
        sys.exit(f"SST-2 not found at {DATA}: the shared data folder is needed for this table")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, (label, method, lr) in enumerate(METHODS):
            summary, evals = train_once(method, lr, args.steps, f"{tmp}/{i}")
            row = {"method": label, "type": method["type"], "lr": lr, "before": evals[0]["accuracy"],
                   "after": evals[-1]["accuracy"], "trainable": summary["trainable_params"],
                   "seconds": summary["wall_time_s"]}
            print(json.dumps(row), flush=True)
            rows.append(row)
    lines = [
        "# Methods",
        "",
        "Every method on the same short budget: the embedded MiniLM (all-MiniLM-L6-v2, 22.7M parameters)",
        f"fine-tuned with `deltatune train` for {args.steps} AdamW steps of 16 SST-2 sentences (the first 960",
        "training rows, max length 64, constant learning rate, seed 0), evaluated on the first 200 dev",
        "sentences. A short budget, not a leaderboard: it shows that each method learns, and what it costs",
        "in trainable parameters (the classification head, which every method trains, included).",
        "Produced by `python scripts/method_table.py` (one CPU thread per run on a shared 2-core AVX2 machine;",
        "wall time is indicative only).",
        "",
        "| method | `type:` | lr | dev acc. before | dev acc. after | trainable parameters | wall time (s) |",
        "|---|---|---|---|---|---|---|",
        *[f"| {r['method']} | `{r['type']}` | {r['lr']:g} | {r['before']:.3f} | {r['after']:.3f} | "
          f"{r['trainable']:,} | {r['seconds']:.0f} |" for r in rows],
        "",
    ]
    Path(args.out).write_text("\n".join(lines))


if __name__ == "__main__":
    main()
