"""Prefix tuning (Li & Liang 2021): the method contract on encoder, decoder and encoder-decoder
toys, trainable counts against the formula and PEFT, the reparameterisation MLP folded away for
inference, HF PEFT parity both ways, and greedy generation through the KV cache after a reload."""

from __future__ import annotations

import peft
import pytest
import torch

import deltatune as dt
from deltatune.methods.prefix import PrefixTuningConfig
from deltatune.methods.prompt.encoders import SoftPrompt
from tests.methods import contract
from tests.methods.test_prompt_tuning import (GENERATING_TOYS, HEAD, N, PARITY_TOYS, PEFT_TASK, config_for,
                                              deltatune_file_loads_in_peft, generates_the_same_after_reload,
                                              peft_file_loads_in_deltatune)

HIDDEN = 16
PLAIN = PrefixTuningConfig(num_virtual_tokens=N)
PROJECTED = PrefixTuningConfig(num_virtual_tokens=N, prefix_projection=True, encoder_hidden_size=HIDDEN)


def geometry(toy: contract.Toy) -> tuple[int, int]:
    """(layers, key/value width of one layer) of a decoder-only or encoder toy, from its config."""
    cfg = toy.base().config
    heads = cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    return cfg.num_hidden_layers, kv_heads * (cfg.hidden_size // heads)


def plain_count(toy: contract.Toy) -> int:
    layers, token_dim = geometry(toy)
    return N * layers * 2 * token_dim


def projected_count(toy: contract.Toy) -> int:
    layers, token_dim = geometry(toy)
    return N * token_dim + (token_dim * HIDDEN + HIDDEN) + (HIDDEN * layers * 2 * token_dim + layers * 2 * token_dim)


@pytest.mark.parametrize("config", [PLAIN, PROJECTED], ids=["plain", "projected"])
@pytest.mark.parametrize("toy", contract.TOYS.values(), ids=contract.TOYS.keys())
def test_prefix_contract(toy, config, tmp_path):
    contract.check_only_adapter_parameters_train(toy, config)
    contract.check_changes_and_disables(toy, config)
    tensors = contract.check_save_load(toy, config, tmp_path)
    # as PEFT: only the (folded) prefix table, and the classifier copy of a classification toy
    assert [k for k in tensors if ".classifier." not in k] == ["prompt_embeddings"]
    contract.check_remove_restores_base(toy, config)
    contract.check_mixed_batch(toy, config, refused="cannot share a mixed batch")


@pytest.mark.parametrize("name", ["bert", "gpt2", "llama"])
def test_trainable_count_matches_formula_and_peft(name):
    toy = contract.TOYS[name]
    head = HEAD if name == "bert" else 0
    for config, formula, projection in ((PLAIN, plain_count(toy), False), (PROJECTED, projected_count(toy), True)):
        contract.check_trainable_count(toy, config, formula + head)
        theirs = peft.get_peft_model(toy.base(), peft.PrefixTuningConfig(
            task_type=PEFT_TASK[name], num_virtual_tokens=N, prefix_projection=projection,
            encoder_hidden_size=HIDDEN))
        assert theirs.get_nb_trainable_parameters()[0] == formula + head, projection


def test_t5_count_equals_peft():
    toy = contract.TOYS["t5"]
    for config, projection in ((PLAIN, False), (PROJECTED, True)):
        ours = dt.attach(toy.base(), config).parameter_counts()[0]
        theirs = peft.get_peft_model(toy.base(), peft.PrefixTuningConfig(
            task_type="SEQ_2_SEQ_LM", num_virtual_tokens=N, prefix_projection=projection,
            encoder_hidden_size=HIDDEN)).get_nb_trainable_parameters()[0]
        assert ours == theirs, projection


def test_fold_replaces_the_mlp_by_its_output_and_keeps_the_outputs(tmp_path):
    toy = contract.TOYS["llama"]
    model = contract.perturbed(dt.attach(toy.base(), PROJECTED))
    adapter = model.model_adapters["default"]
    table = adapter.table().detach().clone()
    before = contract.logits(model, toy.loss_batch())
    adapter.fold()
    assert isinstance(adapter.source, SoftPrompt)
    torch.testing.assert_close(adapter.table(), table)
    torch.testing.assert_close(contract.logits(model, toy.loss_batch()), before, atol=1e-6, rtol=0)
    model.save(tmp_path)
    loaded = dt.load(toy.base(), tmp_path)
    assert isinstance(loaded.model_adapters["default"].source, SoftPrompt)  # a loaded adapter has no MLP
    torch.testing.assert_close(contract.logits(loaded, toy.loss_batch()), before, atol=1e-6, rtol=0)


def test_merge_is_refused():
    model = dt.attach(contract.TOYS["gpt2"].base(), PLAIN)
    with pytest.raises(dt.AdapterError, match="cannot be merged"):
        model.merge()


@pytest.mark.parametrize("bad, match", [
    ({"prefix_projection": "yes"}, "prefix_projection"),
    ({"encoder_hidden_size": 0}, "encoder_hidden_size"),
    ({"init_weights": "ones"}, "init_weights"),
])
def test_invalid_configs_are_refused(bad, match):
    with pytest.raises(dt.ConfigError, match=match):
        PrefixTuningConfig(num_virtual_tokens=N, **bad)


@pytest.mark.parametrize("projection", [False, True], ids=["plain", "projected"])
@pytest.mark.parametrize("name", PARITY_TOYS)
def test_peft_prefix_file_loads_with_identical_outputs(name, projection, tmp_path):
    peft_file_loads_in_deltatune(PARITY_TOYS[name], peft.PrefixTuningConfig(
        task_type=PEFT_TASK[name], num_virtual_tokens=N, prefix_projection=projection,
        encoder_hidden_size=HIDDEN), tmp_path)


@pytest.mark.parametrize("name", PARITY_TOYS)
def test_deltatune_prefix_file_loads_in_peft_with_identical_outputs(name, tmp_path):
    config = PROJECTED if name == "llama" else PLAIN
    deltatune_file_loads_in_peft(PARITY_TOYS[name], config_for(name, config), tmp_path)


@pytest.mark.parametrize("name", GENERATING_TOYS)
def test_generate_same_tokens_after_reload_and_in_peft(name, tmp_path):
    generates_the_same_after_reload(contract.TOYS[name], PLAIN, tmp_path)


@pytest.mark.slow
def test_prefix_tuning_learns_sst2():
    from tests.methods.short_training import train_briefly

    run = train_briefly(PrefixTuningConfig(num_virtual_tokens=10), steps=60, lr=1e-2)
    assert run.trainable == 10 * 6 * 2 * 384 + (384 * 2 + 2), run  # MiniLM: 6 layers, width 384; + head
    assert run.accuracy_after > run.accuracy_before + 0.10, run
