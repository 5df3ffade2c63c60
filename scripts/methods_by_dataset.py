"""Table 3 of docs/experiments.md: accuracy of each method on each data set, from a methods
sweep's results.csv (mean ± sample std where a setting has several seeds).

    python scripts/methods_by_dataset.py [runs/experiments/methods/results.csv]
"""

from __future__ import annotations

import sys
from collections import defaultdict

from deltatune.experiments.results import mean_std, read_csv

ORDER = ("lora", "ia3", "adapters", "prompt", "bitfit", "head-only", "full")
DATASETS = ("sst2", "mr", "subj", "trec")


def cell(values: list[float]) -> str:
    if not values:
        return "-"
    mean, std = mean_std(values)
    return f"{mean:.3f}" if std is None else f"{mean:.3f} ± {std:.3f} ({len(values)})"


def main(path: str = "runs/experiments/methods/results.csv") -> None:
    accuracy: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    params: dict[str, int] = {}
    for row in read_csv(path):
        if row["status"] != "ok":
            continue
        name = row["setup"] or row["method"]  # baseline rows have no grid setup
        accuracy[name][row["dataset"]].append(float(row["eval_accuracy"]))
        if row["dataset"] == "sst2":
            params[name] = int(row["trainable_params"])
    print("| method | trainable params (SST-2) | " + " | ".join(d.upper() for d in DATASETS) + " |")
    print("|---|---|" + "---|" * len(DATASETS))
    for name in ORDER:
        if name in accuracy:
            shown = f"{params[name]:,}" if name in params else "-"
            print(f"| {name} | {shown} | " + " | ".join(cell(accuracy[name][d]) for d in DATASETS) + " |")


if __name__ == "__main__":
    main(*sys.argv[1:])
