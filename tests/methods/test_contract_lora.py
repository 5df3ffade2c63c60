"""LoRA and DoRA through the shared method contract (the LoRA-specific checks live in tests/test_lora_*.py)."""

import pytest

import deltatune as dt
from tests.methods import contract

CONFIGS = {"lora": dt.LoraConfig(r=4, alpha=8, targets=["q", "v"]),
           "dora": dt.LoraConfig(r=4, alpha=8, targets=["q", "v"], dora=True)}


@pytest.mark.parametrize("variant", CONFIGS)
@pytest.mark.parametrize("toy", contract.TOYS.values(), ids=contract.TOYS.keys())
def test_lora_contract(toy, variant, tmp_path):
    contract.check_contract(toy, CONFIGS[variant], tmp_path)
