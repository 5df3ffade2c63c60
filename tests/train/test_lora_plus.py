"""LoRA+: B matrices at ratio x the learning rate, from the Python helper and from a recipe key,
checked against peft's own LoRA+ optimizer on the same adapter."""

from __future__ import annotations

import pytest
import torch

import deltatune as dt
from deltatune.train import lora_plus_groups
from deltatune.train.optim import build_optimizer
from deltatune.train.recipe import from_dict
from tests.toy_models import TOYS, peft_lora


def _lr_by_name(model, groups) -> dict[str, float]:
    lr_of = {id(p): g["lr"] for g in groups for p in g["params"]}
    return {n.removeprefix("base_model.").removeprefix("model."): lr_of[id(p)]
            for n, p in model.named_parameters() if p.requires_grad}


def test_helper_groups_equal_peft_loraplus_optimizer_learning_rates():
    from peft.optimizers import create_loraplus_optimizer
    toy = TOYS["llama"]
    ours = dt.attach(toy.base(), dt.LoraConfig(r=4, targets=["q", "v", "down"]))
    theirs = peft_lora(toy, toy.base(), r=4, target_modules=["q_proj", "v_proj", "down_proj"])
    reference = create_loraplus_optimizer(theirs, torch.optim.AdamW, lr=2e-4, loraplus_lr_ratio=8)
    groups = lora_plus_groups(ours, lr=2e-4, ratio=8)
    # every trainable parameter exactly once, at peft's learning rate
    assert sum(len(g["params"]) for g in groups) == sum(p.requires_grad for p in ours.parameters())
    expected = {n.removeprefix("base_model.model.").removeprefix("model."): lr
                for n, lr in _lr_by_name(theirs, reference.param_groups).items()}
    assert _lr_by_name(ours, groups) == pytest.approx(expected)
    assert sorted(set(expected.values())) == pytest.approx([2e-4, 1.6e-3])
    torch.optim.AdamW(groups, lr=2e-4).step()  # the groups are what torch's optimizers take


def test_recipe_key_sets_the_ratio_and_is_checked():
    recipe = from_dict({"model": "x", "method": {"type": "lora"}, "data": {"train": "t.tsv"},
                        "train": {"lr": 1e-4, "lora_plus_ratio": 16}})
    model = dt.attach(TOYS["bert"].base(), dt.LoraConfig(r=2, targets=["q"]))
    lrs = _lr_by_name(model, build_optimizer(model, recipe.train).param_groups)
    assert sorted(lr for n, lr in lrs.items() if ".lora_B." in n) == pytest.approx([1.6e-3] * 4)
    assert sorted(lr for n, lr in lrs.items() if ".lora_A." in n) == pytest.approx([1e-4] * 4)
    with pytest.raises(dt.ConfigError, match="lora_plus_ratio must be positive"):
        from_dict({"model": "x", "method": {"type": "lora"}, "data": {"train": "t.tsv"},
                   "train": {"lora_plus_ratio": -1}}).validate()
