"""LoRA and DoRA through the shared method contract (the LoRA-specific checks live in tests/test_lora_*.py)."""

import pytest

import deltatune as dt
from tests.methods import contract

CONFIGS = {"lora": dt.LoraConfig(r=4, alpha=8, targets=["q", "v"]),
           "dora": dt.LoraConfig(r=4, alpha=8, targets=["q", "v"], dora=True)}


@pytest.mark.parametrize("variant", CONFIGS)
@pytest.mark.parametrize("toy", contract.TOYS.values(), ids=contract.TOYS.keys())
def test_lora_contract(toy, variant, tmp_path):
    config = CONFIGS[variant]
    contract.check_only_adapter_parameters_train(toy, config)
    contract.check_changes_and_disables(toy, config)
    contract.check_save_load(toy, config, tmp_path)
    contract.check_merge(toy, config)
    contract.check_remove_restores_base(toy, config)
    contract.check_mixed_batch(toy, config)
