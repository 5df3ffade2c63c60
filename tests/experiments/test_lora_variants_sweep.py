"""Recipes and sweeps take the LoRA variants: DoRA, PiSSA/OLoRA, LoRA+ (resolved, not trained)."""

from __future__ import annotations

import pytest

from deltatune.errors import ConfigError
from deltatune.experiments.grid import load_sweep
from deltatune.train.methods import resolve

VARIANTS = [
    {"name": "lora", "method": {"type": "lora", "r": 4}},
    {"name": "dora", "method": {"type": "lora", "r": 4, "dora": True}},
    {"name": "pissa", "method": {"type": "lora", "r": 4, "init": "pissa"}},
    {"name": "olora-dora", "method": {"type": "lora", "r": 4, "init": "olora", "dora": True}},
    {"name": "lora-plus", "method": {"type": "lora", "r": 4}, "train.lora_plus_ratio": 16},
]


def test_a_sweep_over_the_variants_resolves_each_run_to_its_config(recipe, tmp_path):
    sweep = load_sweep({"recipe": recipe(), "grid": {"variant": VARIANTS}, "seeds": [0], "baselines": [],
                        "output_dir": str(tmp_path / "sweep")})
    runs = {r.label.removeprefix("variant="): r for r in sweep.runs()}
    configs = {name: resolve(run.recipe["method"]).config for name, run in runs.items()}
    assert {n: (c.dora, c.init) for n, c in configs.items()} == {
        "lora": (False, "kaiming"), "dora": (True, "kaiming"), "pissa": (False, "pissa"),
        "olora-dora": (True, "olora"), "lora-plus": (False, "kaiming")}
    assert runs["lora-plus"].recipe["train"]["lora_plus_ratio"] == 16
    assert runs["dora"].recipe["train"]["lora_plus_ratio"] is None


def test_bad_variant_values_fail_when_the_recipe_is_read():
    with pytest.raises(ConfigError, match="dora must be true or false"):
        resolve({"type": "lora", "dora": "maybe"})
    with pytest.raises(ConfigError, match="init must be one of"):
        resolve({"type": "lora", "init": "svd"})
