"""One epoch as users run it: ``deltatune train`` against HF peft + ``transformers.Trainer``.

Both train LoRA r=8 (alpha 16) on the query and value projections of the embedded MiniLM, plus
the classification head, for one epoch over the first 4,000 SST-2 training sentences (batch 32,
AdamW at lr 1e-3 with a linear decay and no warm-up, fp32, gradient clipping at 1.0, as the
Trainer does by default), and then score the 872 dev sentences. Each run is a fresh process,
timed by the wall clock from its start to its end, start-up included; the two alternate, one
seed after the other. deltatune runs through its CLI with a recipe; the reference is the script
a peft user would write (``--reference``: dynamic padding with ``DataCollatorWithPadding``,
Trainer defaults otherwise). Prints the headline, then one JSON line (also written to
benchmarks/results/epoch.json).

    python benchmarks/epoch.py [--seeds 3] [--train 4000] [--threads N] [--set train.group_by_length=false]

Needs the SST-2 files in ../shared/data/sst2 (``--data`` names another folder).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_DATA = HERE.parent.parent / "shared" / "data" / "sst2"
RANK, ALPHA, BATCH, LR, MAX_LENGTH = 8, 16, 32, 1e-3, 66


def recipe_text(data: Path, train: int, out: Path, seed: int) -> str:
    """The recipe deltatune trains from: the settings above, nothing else changed."""
    return f"""model: minilm
task: seq-cls
data: {{train: {data / 'train.tsv'}, eval: {data / 'dev.tsv'}, text: sentence, label: label,
       max_length: {MAX_LENGTH}, max_train: {train}}}
method: {{type: lora, r: {RANK}, alpha: {ALPHA}, targets: [q, v]}}
train: {{epochs: 1, batch_size: {BATCH}, lr: {LR}, schedule: linear, warmup: 0.0, precision: fp32, seed: {seed}}}
output_dir: {out}
"""


def deltatune_command() -> list[str]:
    """``deltatune`` as installed next to this interpreter, else ``python -m deltatune``."""
    script = Path(sys.executable).parent / "deltatune"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "deltatune"]


def run_deltatune(data: Path, train: int, seed: int, env: dict, overrides: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as folder:
        recipe, out = Path(folder) / "epoch.yaml", Path(folder) / "run"
        recipe.write_text(recipe_text(data, train, out, seed))
        start = time.perf_counter()
        sets = [arg for value in overrides for arg in ("--set", value)]
        subprocess.run([*deltatune_command(), "train", str(recipe), "--quiet", *sets], check=True, env=env)
        wall = time.perf_counter() - start
        summary = json.loads((out / "summary.json").read_text())
    return {"wall_s": round(wall, 2), "accuracy": summary["metrics"]["accuracy"],
            "inside_s": {"setup": round(summary["wall_time_s"] - summary["train_time_s"], 2),
                         "train_and_eval": summary["train_time_s"],
                         "start_up": round(wall - summary["wall_time_s"], 2)}}


def run_reference(data: Path, train: int, seed: int, env: dict, overrides: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as folder:
        result = Path(folder) / "result.json"
        start = time.perf_counter()
        subprocess.run([sys.executable, __file__, "--reference", str(data), str(train), str(seed), str(result)],
                       check=True, env=env)
        wall = time.perf_counter() - start
        return {"wall_s": round(wall, 2), **json.loads(result.read_text())}


def reference(data: Path, train: int, seed: int, result: Path) -> None:
    """Child process: the peft + Trainer run, written as a peft user would write it."""
    began = time.perf_counter()
    import csv

    import numpy as np
    import peft
    import torch
    from transformers import (AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding, Trainer,
                              TrainingArguments, set_seed)

    from deltatune.core.loading import resolve_model  # where the embedded MiniLM's files are

    def rows(path: Path, limit: int | None = None) -> list[dict]:
        with open(path, newline="", encoding="utf-8") as fh:
            out = [{"text": r["sentence"], "label": int(r["label"])} for r in csv.DictReader(fh, delimiter="\t")]
        return out[:limit] if limit else out

    set_seed(seed)
    source = resolve_model("minilm")
    tokenizer = AutoTokenizer.from_pretrained(source.path, **source.pretrained_kwargs())

    def encode(items: list[dict]) -> list[dict]:
        enc = tokenizer([r["text"] for r in items], truncation=True, max_length=MAX_LENGTH)
        return [{"input_ids": ids, "attention_mask": mask, "labels": r["label"]}
                for ids, mask, r in zip(enc["input_ids"], enc["attention_mask"], items)]

    train_set, dev_set = encode(rows(data / "train.tsv", train)), encode(rows(data / "dev.tsv"))
    model = AutoModelForSequenceClassification.from_pretrained(source.path, num_labels=2,
                                                               **source.pretrained_kwargs())
    model = peft.get_peft_model(model, peft.LoraConfig(task_type="SEQ_CLS", r=RANK, lora_alpha=ALPHA,
                                                       target_modules=["query", "value"]))
    setup = time.perf_counter()
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(output_dir=out, num_train_epochs=1, per_device_train_batch_size=BATCH,
                                 per_device_eval_batch_size=BATCH, learning_rate=LR, lr_scheduler_type="linear",
                                 seed=seed, save_strategy="no", report_to=[], use_cpu=True,
                                 disable_tqdm=True, logging_strategy="no")
        trainer = Trainer(model=model, args=args, train_dataset=train_set,
                          data_collator=DataCollatorWithPadding(tokenizer))
        trainer.train()
        logits = trainer.predict(dev_set).predictions
    accuracy = float((np.argmax(logits, -1) == np.array([r["labels"] for r in dev_set])).mean())
    result.write_text(json.dumps({"accuracy": round(accuracy, 4), "inside_s": {
        "setup": round(setup - began, 2), "train_and_eval": round(time.perf_counter() - setup, 2)},
        "threads": torch.get_num_threads()}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--train", type=int, default=4000, help="training sentences (the first N)")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="folder with train.tsv and dev.tsv")
    parser.add_argument("--threads", type=int, help="OMP_NUM_THREADS for both (default: torch's own choice)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="change deltatune's recipe, e.g. --set train.group_by_length=false (repeatable)")
    parser.add_argument("--reference", nargs=4, metavar=("DATA", "TRAIN", "SEED", "RESULT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.reference:
        data, train, seed, result = args.reference
        reference(Path(data), int(train), int(seed), Path(result))
        return
    if not (args.data / "train.tsv").is_file():
        sys.exit(f"no SST-2 data in {args.data} (train.tsv, dev.tsv); pass --data FOLDER")
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "TOKENIZERS_PARALLELISM": "false"}
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    sys.path.insert(0, str(HERE))
    from common import finish, machine

    runs: dict[str, list[dict]] = {"deltatune": [], "peft_trainer": []}
    for seed in range(args.seeds):
        # alternate which goes first, so that a drift in the machine's load hits both alike
        order = ("deltatune", "peft_trainer") if seed % 2 == 0 else ("peft_trainer", "deltatune")
        for system in order:
            run = (run_deltatune if system == "deltatune" else run_reference)(args.data, args.train, seed, env,
                                                                                args.overrides)
            runs[system].append({"seed": seed, **run})
            print(f"seed {seed} {system}: {run['wall_s']:.1f} s, dev accuracy {run['accuracy']:.4f}",
                  file=sys.stderr, flush=True)
    mean = {k: {"wall_s": round(statistics.mean(r["wall_s"] for r in v), 2),
                "accuracy": round(statistics.mean(r["accuracy"] for r in v), 4)} for k, v in runs.items()}
    ratios = [d["wall_s"] / p["wall_s"] for d, p in zip(runs["deltatune"], runs["peft_trainer"])]
    result = {
        "benchmark": "epoch", "model": "minilm", "train_sentences": args.train, "seeds": args.seeds,
        "settings": {"rank": RANK, "alpha": ALPHA, "targets": ["query", "value"], "batch": BATCH, "lr": LR,
                     "schedule": "linear, no warm-up", "precision": "fp32", "max_length": MAX_LENGTH},
        "machine": machine(), "threads": args.threads or "torch's default", "recipe_changes": args.overrides,
        "clock": "wall clock around each training process, start-up included",
        "mean": mean, "wall_ratio": round(mean["deltatune"]["wall_s"] / mean["peft_trainer"]["wall_s"], 3),
        "wall_ratio_per_seed": [round(r, 3) for r in ratios],
        "accuracy_gap_points": round(100 * (mean["deltatune"]["accuracy"] - mean["peft_trainer"]["accuracy"]), 2),
        "runs": runs,
    }
    finish(result, [
        f"epoch: deltatune train / peft + Trainer wall time {result['wall_ratio']:.3f} (goal <= 0.45; "
        f"{mean['deltatune']['wall_s']:.1f} s vs {mean['peft_trainer']['wall_s']:.1f} s, per seed "
        f"{', '.join(f'{r:.3f}' for r in ratios)})",
        f"mean dev accuracy: deltatune {mean['deltatune']['accuracy']:.4f}, peft + Trainer "
        f"{mean['peft_trainer']['accuracy']:.4f} (gap {result['accuracy_gap_points']:+.2f} points; goal >= -0.5)",
    ])


if __name__ == "__main__":
    main()
