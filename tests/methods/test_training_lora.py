"""LoRA learns SST-2 sentiment on the embedded MiniLM in a short budget."""

import deltatune as dt
from tests.methods.short_training import train_briefly


def test_lora_beats_untrained_minilm():
    run = train_briefly(dt.LoraConfig(r=8, alpha=16, targets=["q", "v"]), steps=60, lr=3e-3)
    assert run.accuracy_after > run.accuracy_before + 0.10, run
