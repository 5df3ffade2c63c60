"""Subspace similarity of the *initial* LoRA A matrices of two ranks (the control for
`deltatune analyze subspace` on trained adapters, docs/experiments.md).

Builds the model exactly as `deltatune train` does for experiments/minilm-sst2.yaml (same seed,
same code path) at each rank, without training, and prints phi for every adapted module.

    .venv/bin/python experiments/init_similarity.py 8 64
"""

from __future__ import annotations

import sys

import torch
from transformers import set_seed

import deltatune as dt
from deltatune.experiments.subspace import similarity
from deltatune.train import tasks
from deltatune.train.methods import resolve
from deltatune.train.recipe import load
from deltatune.train.run import build_model, load_data


def initial_a(recipe_path: str, r: int) -> dict[str, torch.Tensor]:
    """``{module: A}`` right after ``deltatune train`` would have built the model at rank ``r``."""
    recipe = load(recipe_path, [f"method.r={r}"])
    set_seed(recipe.train.seed)
    method = resolve(recipe.method)
    task = tasks.get(recipe.task)(recipe.data, dt.load_tokenizer(recipe.model))
    load_data(recipe, task)
    model = build_model(recipe, task, method, torch.device("cpu"))
    return {n.split("bert.", 1)[-1].removesuffix(".lora_A.default.weight"): p.detach().clone()
            for n, p in model.named_parameters() if "lora_A" in n}


def main(r1: int, r2: int, recipe_path: str = "experiments/minilm-sst2.yaml") -> None:
    a, b = initial_a(recipe_path, r1), initial_a(recipe_path, r2)
    print(f"| module | phi_init({r1},{r2}) | phi_init(1,{r2}) | phi_init({r1},{r1}) |")
    print("|---|---|---|---|")
    for name in a:
        print(f"| {name} | {similarity(a[name], b[name]):.3f} | {similarity(a[name], b[name], 1, r2):.3f} | "
              f"{similarity(a[name], b[name], r1, min(r1, r2)):.3f} |")


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), *sys.argv[3:4])
