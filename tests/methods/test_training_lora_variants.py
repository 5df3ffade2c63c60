"""DoRA and PiSSA learn SST-2 at least as well as plain LoRA on the same short MiniLM budget."""

import functools
import statistics

import pytest

import deltatune as dt
from tests.methods.short_training import train_briefly

# Mean dev accuracy over three seeds (data order and classifier head), 200 dev sentences each. The
# seeds move every method by up to 0.09, but a variant and LoRA trained on the same seed move together:
# the paired gaps (variant - LoRA) spread by 0.01-0.02 (standard deviation), so their mean is known to
# about 0.01, and the variant's mean may trail LoRA's by at most that, two sentences, before it counts.
SLACK = 0.01
SEEDS = (0, 1, 2)
BUDGET = {"steps": 60, "lr": 3e-3}

# measured 2026-12-03 (this loop, seeds 0/1/2): LoRA 0.795/0.705/0.755 (mean 0.752), DoRA 0.785/0.710/0.760
# (mean 0.752, passes), PiSSA 0.755/0.680/0.750 (mean 0.728): it trails LoRA on every seed, by 0.023 on average;
# with alpha = r, as its paper sets it, 0.745/0.695/0.760 (mean 0.733;
# LoRA with alpha = r: 0.770/0.715/0.780, mean 0.755).
# PiSSA's paper, peft's example and later sweeps train it at a lower lr than LoRA, so both were swept over
# lr (same loop and seeds, mean of 3): LoRA 3e-3 0.752, 2e-3 0.753, 1e-3 0.702, 5e-4 0.562, 2e-4 0.522;
# PiSSA 3e-3 0.728, 2e-3 0.713, 1e-3 0.727 (0.725/0.720/0.735; alpha = r: 0.695), 5e-4 0.543, 2e-4 0.513.
# Below 1e-3 the new classification head hardly moves in 60 steps and most seeds predict one class, for both
# methods. Each at its best lr, PiSSA (0.728) still trails LoRA (0.753) by more than SLACK, so the comparison
# stays at the shared 3e-3 (PiSSA's best, within 0.001 of LoRA's) and PiSSA a strict xfail. At 1e-3 PiSSA leads
# LoRA by 0.025 on average and on every seed.
PISSA_TRAILS = pytest.mark.xfail(strict=True, reason="PiSSA trails plain LoRA on this 60-step budget, each "
                                                     "at its best lr (mean 0.728 against 0.753)")


@functools.cache
def mean_accuracy(**variant) -> tuple[float, float]:
    """(mean accuracy after, lowest gain over the accuracy before) over SEEDS."""
    runs = [train_briefly(dt.LoraConfig(r=8, alpha=16, targets=["q", "v"], **variant), seed=seed, **BUDGET)
            for seed in SEEDS]
    return statistics.mean(r.accuracy_after for r in runs), min(r.accuracy_after - r.accuracy_before for r in runs)


@pytest.mark.slow
@pytest.mark.parametrize("variant", [{"dora": True}, pytest.param({"init": "pissa"}, marks=PISSA_TRAILS)],
                         ids=["dora", "pissa"])
def test_variant_reaches_plain_lora_accuracy_on_the_short_sst2_budget(variant):
    lora, _ = mean_accuracy()
    run, gain = mean_accuracy(**variant)
    assert gain > 0.10, gain  # every seed learns
    assert run >= lora - SLACK, (run, lora)
