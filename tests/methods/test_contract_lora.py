"""LoRA through the shared method contract (the LoRA-specific checks live in tests/test_lora_*.py)."""

import pytest

import deltatune as dt
from tests.methods import contract

CONFIG = dt.LoraConfig(r=4, alpha=8, targets=["q", "v"])


@pytest.mark.parametrize("toy", contract.TOYS.values(), ids=contract.TOYS.keys())
def test_lora_contract(toy, tmp_path):
    contract.check_only_adapter_parameters_train(toy, CONFIG)
    contract.check_changes_and_disables(toy, CONFIG)
    contract.check_save_load(toy, CONFIG, tmp_path)
    contract.check_merge(toy, CONFIG)
    contract.check_remove_restores_base(toy, CONFIG)
    contract.check_mixed_batch(toy, CONFIG)
