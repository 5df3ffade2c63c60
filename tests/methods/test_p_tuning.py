"""P-tuning (Liu et al. 2021): the method contract with MLP and LSTM prompt encoders, parameter
counts against the formula and PEFT, the encoder output as the saved state, HF PEFT parity both
ways, greedy generation after a reload, and a short real training run."""

from __future__ import annotations

import peft
import pytest
import torch
import torch.nn.functional as F

import deltatune as dt
from deltatune.methods.prompt import PTuningConfig
from deltatune.methods.prompt.encoders import SoftPrompt
from tests.methods import contract
from tests.methods.short_training import train_briefly
from tests.methods.test_prompt_tuning import (GENERATING_TOYS, HEAD, N, PARITY_TOYS, PEFT_TASK, WIDTH, config_for,
                                              deltatune_file_loads_in_peft, generates_the_same_after_reload,
                                              peft_file_loads_in_deltatune)

HIDDEN = 16
MLP = PTuningConfig(num_virtual_tokens=N, encoder_hidden_size=HIDDEN)
LSTM = PTuningConfig(num_virtual_tokens=N, encoder_hidden_size=HIDDEN, encoder_reparameterization_type="LSTM")
DECODER_ONLY_OUTPUTS_WITH_VIRTUAL = ("gpt2", "llama", "bert-encoder")


def mlp_count(rows: int = N, d: int = WIDTH, h: int = HIDDEN) -> int:
    return rows * d + (d * h + h) + (h * h + h) + (h * d + d)


def lstm_count(rows: int = N, d: int = WIDTH, h: int = HIDDEN, layers: int = 2) -> int:
    lstm = 0
    for layer in range(layers):
        inputs = d if layer == 0 else 2 * h
        lstm += 2 * (4 * h * inputs + 4 * h * h + 8 * h)  # two directions, two bias vectors each
    return rows * d + lstm + (2 * h * 2 * h + 2 * h) + (2 * h * d + d)


@pytest.mark.parametrize("toy", contract.TOYS.values(), ids=contract.TOYS.keys())
def test_p_tuning_mlp_contract(toy, tmp_path):
    contract.check_only_adapter_parameters_train(toy, MLP)
    contract.check_changes_and_disables(toy, MLP)
    tensors = contract.check_save_load(toy, MLP, tmp_path)
    assert tuple(tensors["prompt_embeddings"].shape) == (N, WIDTH)
    contract.check_remove_restores_base(toy, MLP)
    contract.check_mixed_batch(toy, MLP, refused="cannot share a mixed batch")


@pytest.mark.parametrize("name", ["bert", "llama"])
def test_p_tuning_lstm_contract(name, tmp_path):
    toy = contract.TOYS[name]
    contract.check_only_adapter_parameters_train(toy, LSTM)
    contract.check_changes_and_disables(toy, LSTM)
    contract.check_save_load(toy, LSTM, tmp_path)
    contract.check_remove_restores_base(toy, LSTM)


@pytest.mark.parametrize("config, formula, kind", [(MLP, mlp_count(), "MLP"), (LSTM, lstm_count(), "LSTM")],
                         ids=["mlp", "lstm"])
@pytest.mark.parametrize("name", ["bert", "gpt2"])
def test_trainable_count_matches_formula_and_peft(name, config, formula, kind):
    toy = contract.TOYS[name]
    head = HEAD if name == "bert" else 0
    contract.check_trainable_count(toy, config, formula + head)
    theirs = peft.get_peft_model(toy.base(), peft.PromptEncoderConfig(
        task_type=PEFT_TASK[name], num_virtual_tokens=N, encoder_hidden_size=HIDDEN,
        encoder_reparameterization_type=kind))
    assert theirs.get_nb_trainable_parameters()[0] == formula + head


def test_saved_state_is_the_encoder_output(tmp_path):
    """The file holds MLP(embedding) computed by hand, not the encoder's weights."""
    toy = contract.TOYS["gpt2"]
    model = contract.perturbed(dt.attach(toy.base(), MLP))
    encoder = model.model_adapters["default"].source
    first, second, third = (encoder.mlp_head[i] for i in (0, 2, 4))
    x = encoder.embedding.weight
    by_hand = F.linear(F.relu(F.linear(F.relu(F.linear(x, first.weight, first.bias)), second.weight, second.bias)),
                       third.weight, third.bias)
    model.save(tmp_path)
    from safetensors.torch import load_file
    saved = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert list(saved) == ["prompt_embeddings"]
    torch.testing.assert_close(saved["prompt_embeddings"], by_hand.detach(), atol=1e-6, rtol=0)


def test_loaded_adapter_is_the_folded_table_and_can_train_on(tmp_path):
    toy = contract.TOYS["llama"]
    model = contract.perturbed(dt.attach(toy.base(), LSTM))
    expected = contract.logits(model, toy.loss_batch())
    model.save(tmp_path)
    loaded = dt.load(toy.base(), tmp_path, trainable=True)
    adapter = loaded.model_adapters["default"]
    assert isinstance(adapter.source, SoftPrompt)
    assert loaded.parameter_counts()[0] == N * WIDTH  # the table itself trains on; the encoder is gone
    torch.testing.assert_close(contract.logits(loaded, toy.loss_batch()), expected, atol=1e-6, rtol=0)
    frozen = dt.load(toy.base(), tmp_path)
    assert frozen.parameter_counts()[0] == 0


def test_fold_keeps_the_outputs():
    toy = contract.TOYS["t5"]
    model = contract.perturbed(dt.attach(toy.base(), MLP))
    before = contract.logits(model, toy.loss_batch())
    model.model_adapters["default"].fold()
    assert isinstance(model.model_adapters["default"].source, SoftPrompt)
    torch.testing.assert_close(contract.logits(model, toy.loss_batch()), before, atol=1e-6, rtol=0)


def test_merge_is_refused():
    model = dt.attach(contract.TOYS["llama"].base(), MLP)
    with pytest.raises(dt.AdapterError, match="cannot be merged"):
        model.merge()


@pytest.mark.parametrize("bad, match", [
    ({"encoder_reparameterization_type": "GRU"}, r"encoder_reparameterization_type must be one of \('MLP', 'LSTM'\)"),
    ({"encoder_hidden_size": 0}, "encoder_hidden_size"),
    ({"encoder_dropout": 1.5}, "encoder_dropout"),
    ({"encoder_num_layers": 0}, "encoder_num_layers"),
])
def test_invalid_configs_are_refused(bad, match):
    with pytest.raises(dt.ConfigError, match=match):
        PTuningConfig(num_virtual_tokens=N, **bad)


@pytest.mark.parametrize("name", PARITY_TOYS)
def test_peft_p_tuning_file_loads_with_identical_outputs(name, tmp_path):
    virtual = N if name in DECODER_ONLY_OUTPUTS_WITH_VIRTUAL else 0
    kind = "LSTM" if name == "t5" else "MLP"  # on T5, PEFT's default two-block layout runs 2N rows through the LSTM
    loaded = peft_file_loads_in_deltatune(PARITY_TOYS[name], peft.PromptEncoderConfig(
        task_type=PEFT_TASK[name], num_virtual_tokens=N, encoder_hidden_size=HIDDEN,
        encoder_reparameterization_type=kind), tmp_path, virtual)
    assert loaded.configs["default"].encoder_reparameterization_type == kind


@pytest.mark.parametrize("name", PARITY_TOYS)
def test_deltatune_p_tuning_file_loads_in_peft_with_identical_outputs(name, tmp_path):
    virtual = N if name in DECODER_ONLY_OUTPUTS_WITH_VIRTUAL else 0
    config = LSTM if name == "gpt2" else MLP
    deltatune_file_loads_in_peft(PARITY_TOYS[name], config_for(name, config), tmp_path, virtual)


@pytest.mark.parametrize("name", GENERATING_TOYS)
def test_generate_same_tokens_after_reload_and_in_peft(name, tmp_path):
    generates_the_same_after_reload(contract.TOYS[name], MLP, tmp_path)


@pytest.mark.slow
def test_p_tuning_learns_sst2():
    config = PTuningConfig(num_virtual_tokens=8, encoder_hidden_size=64)
    run = train_briefly(config, steps=60, lr=1e-2)  # a soft-prompt learning rate, as for prefix tuning
    assert run.trainable == mlp_count(8, 384, 64) + (384 * 2 + 2), run
    # soft prompts learn slowly (see prompt tuning's test): 0.53 -> 0.61 here; at lr 3e-3 it did not move
    assert run.accuracy_after > run.accuracy_before + 0.05, run
