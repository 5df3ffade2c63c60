"""``deltatune demo``: LoRA on the embedded MiniLM over the SST-2 sample that ships in the
package; prints dev accuracy before and after training and where the results went."""

from __future__ import annotations

import json
import sys
from importlib import resources
from pathlib import Path

from deltatune.train.callbacks import read_records


def sample_path(split: str) -> str:
    """The packaged SST-2 sample file for ``split`` (``train``: 2,000 rows, ``dev``: 200)."""
    return str(resources.files("deltatune") / "data" / f"sst2_sample_{split}.tsv")


def demo_recipe(out: str) -> dict:
    """The demo's recipe: the ``sst2-lora`` set-up, sized for a few minutes on two CPU cores."""
    return {
        "model": "minilm",
        "task": "seq-cls",
        "data": {"train": sample_path("train"), "eval": sample_path("dev"), "text": "sentence",
                 "label": "label", "max_length": 64},
        "method": {"type": "lora", "r": 8, "alpha": 16, "targets": ["q", "v"]},
        "train": {"epochs": 2, "batch_size": 32, "lr": 2.0e-3, "warmup": 0.06, "eval_every": 40,
                  "eval_on_start": True, "log_every": 10, "seed": 0, "checkpoint_every": 1000, "threads": 1},
        "output_dir": out,
    }


def run_demo(out: str = "runs/demo") -> dict:
    """Train, then print what changed and where everything is. Returns the run's summary."""
    from deltatune.train.run import train

    print("deltatune demo: LoRA (r=8 on q, v) on the embedded MiniLM, 2,000 SST-2 sentences, 2 epochs",
          flush=True)
    summary = train(demo_recipe(out), overwrite=True)
    evals = [r for r in read_records(Path(out) / "metrics.jsonl") if r.get("kind") == "eval"]
    before, after = evals[0]["accuracy"], summary["metrics"]["accuracy"]
    print(f"\ndev accuracy (200 sentences): {before:.3f} before -> {after:.3f} after "
          f"({summary['wall_time_s']:.0f}s, {summary['trainable_params']:,} trainable parameters)")
    print(f"adapter:  {summary['result']}")
    print(f"metrics:  {Path(out) / 'metrics.jsonl'}, {Path(out) / 'summary.json'}")
    if summary.get("plot"):
        print(f"plot:     {summary['plot']}")
    print("try:      deltatune inspect " + summary["result"])
    sys.stdout.flush()
    return summary


if __name__ == "__main__":
    print(json.dumps(run_demo(), indent=2))
