"""BitFit: the shared contract, trainable counts by hand formula, the layer against its formula,
what the file holds, models without biases, and mixing with LoRA."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

import deltatune as dt
from deltatune.methods.bitfit import BitFitConfig, BitFitLayer
from tests.methods import contract
from tests.toy_models import build_llama
from tests.methods.short_training import train_briefly


def _llama_with_biases() -> nn.Module:
    return build_llama(attention_bias=True, mlp_bias=True)


# The LLaMA and T5 toys have no bias anywhere (RMSNorm, bias-free linears): BitFit refuses them
# (tested below), and runs the contract on a LLaMA built with attention and MLP biases instead.
LLAMA_BIASED = replace(contract.TOYS["llama"], name="llama-biased", build=_llama_with_biases)
BIASED_TOYS = {"bert": contract.TOYS["bert"], "gpt2": contract.TOYS["gpt2"], "llama-biased": LLAMA_BIASED}

# Hand formulas for BitFitConfig() ("all", LayerNorms included), hidden 32, FFN 48, 4 blocks.
EXPECTED_COUNT = {
    # per block: q, k, v, attention-out (4 x 32), attention LayerNorm 32, intermediate 48, output
    # 32, output LayerNorm 32; then the embedding LayerNorm 32, the pooler 32; plus the trained
    # copy of the classifier head (32 x 3 + 3)
    "bert": 4 * (4 * 32 + 32 + 48 + 32 + 32) + 32 + 32 + (32 * 3 + 3),
    # per block: c_attn 96, attn c_proj 32, c_fc 128, mlp c_proj 32, ln_1 32, ln_2 32; then ln_f 32
    "gpt2": 4 * (96 + 32 + 128 + 32 + 32 + 32) + 32,
    # per block: q 32, k 16, v 16 (2 kv heads of 8), o 32, gate 48, up 48, down 32; RMSNorm has no bias
    "llama-biased": 4 * (32 + 16 + 16 + 32 + 48 + 48 + 32),
}


@pytest.mark.parametrize("toy", BIASED_TOYS.values(), ids=BIASED_TOYS.keys())
def test_bitfit_contract(toy, tmp_path):
    config = BitFitConfig()
    contract.check_only_adapter_parameters_train(toy, config)
    contract.check_changes_and_disables(toy, config)
    tensors = contract.check_save_load(toy, config, tmp_path)
    deltas = [k for k in tensors if k.endswith(".bias_delta")]
    assert deltas and all(tensors[k].dim() == 1 for k in deltas)
    contract.check_merge(toy, config)
    contract.check_remove_restores_base(toy, config)
    contract.check_mixed_batch(toy, config)
    contract.check_trainable_count(toy, config, EXPECTED_COUNT[toy.name])


@pytest.mark.parametrize("name", ["llama", "t5"])
def test_a_model_without_biases_is_a_clear_config_error(name):
    toy = contract.TOYS[name]
    model = dt.AdaptedModel(toy.base())
    with pytest.raises(dt.ConfigError, match="selects no bias term.*bias=None"):
        model.add(BitFitConfig())
    assert model.adapter_names == []
    assert not any(isinstance(m, BitFitLayer) for m in model.modules())


def test_targets_without_bias_are_skipped_and_only_biased_ones_train():
    model = dt.attach(_llama_with_biases(), BitFitConfig(targets=["q", "v"], layer_norms=False))
    assert {p.rsplit(".", 1)[-1] for p, _ in model.adapter_layers()} == {"q_proj", "v_proj"}
    assert model.parameter_counts()[0] == 4 * (32 + 16)


# --- selection ------------------------------------------------------------------------------

def _bias_paths(model) -> list[str]:
    return [p for p, layer in model.adapter_layers() if isinstance(layer, BitFitLayer)]


def test_layer_norms_switch_and_the_papers_query_and_intermediate_subset():
    bert = contract.TOYS["bert"]
    without_norms = dt.attach(bert.base(), BitFitConfig(layer_norms=False))
    assert not any("LayerNorm" in p for p in _bias_paths(without_norms))
    assert without_norms.parameter_counts()[0] == EXPECTED_COUNT["bert"] - (4 * 2 + 1) * 32

    subset = dt.attach(bert.base(), BitFitConfig(targets=["q", "up"], layer_norms=False))
    assert {p.split("layer.")[1].split(".", 1)[1] for p in _bias_paths(subset)} == \
        {"attention.self.query", "intermediate.dense"}
    assert subset.parameter_counts()[0] == 4 * (32 + 48) + (32 * 3 + 3)


def test_layer_selection_with_layer_norms_reloads_to_the_same_biases(tmp_path):
    toy = contract.TOYS["bert"]
    model = contract.perturbed(dt.attach(toy.base(), BitFitConfig(layers=[0, 3])))
    paths = _bias_paths(model)
    assert paths and all(".layer.0." in p or ".layer.3." in p for p in paths)
    assert any(p.endswith("LayerNorm") for p in paths) and not any("embeddings" in p for p in paths)
    model.save(tmp_path)
    data = json.loads((tmp_path / "adapter_config.json").read_text())
    assert data["deltatune_method"] == "bitfit" and "peft_type" not in data
    loaded = dt.load(toy.base(), tmp_path).eval()
    assert _bias_paths(loaded) == paths
    torch.testing.assert_close(contract.logits(loaded, toy.loss_batch()), contract.logits(model, toy.loss_batch()))


@pytest.mark.parametrize("bad, match", [
    ({"targets": []}, "non-empty list"),
    ({"targets": ["q", 3]}, "non-empty list"),
    ({"layer_norms": "yes"}, "layer_norms must be"),
])
def test_invalid_configs_say_what_to_do(bad, match):
    with pytest.raises(dt.ConfigError, match=match):
        BitFitConfig(**bad)


# --- the layer against its formula ----------------------------------------------------------

@pytest.mark.parametrize("make", [lambda: nn.Linear(6, 4), lambda: Conv1D(4, 6), lambda: nn.LayerNorm(6)],
                         ids=["linear", "conv1d", "layernorm"])
def test_layer_adds_the_bias_deltas_and_merges_into_the_base_bias(make):
    base = make()
    x = torch.randn(3, 5, base.bias.shape[0] if isinstance(base, nn.LayerNorm) else 6)
    original_bias = base.bias.detach().clone()
    with torch.no_grad():
        plain = base(x)
    layer = BitFitLayer(base)
    for name in ("a", "b"):
        layer.add_adapter(name)
        with torch.no_grad():
            layer.bias_delta[name].normal_()
    layer.set_active(["a", "b"])
    both = layer(x)
    torch.testing.assert_close(both, plain + layer.bias_delta["a"].detach() + layer.bias_delta["b"].detach())

    layer.merge()
    torch.testing.assert_close(base.bias.detach(), original_bias + layer.bias_delta["a"] + layer.bias_delta["b"])
    torch.testing.assert_close(layer(x), both)
    layer.unmerge()
    torch.testing.assert_close(base.bias.detach(), original_bias, atol=1e-6, rtol=0)


def test_a_module_without_bias_cannot_be_wrapped():
    with pytest.raises(dt.TargetError, match="without a bias"):
        BitFitLayer(nn.Linear(4, 4, bias=False))


def test_training_changes_only_the_deltas_never_the_base_biases():
    toy = contract.TOYS["gpt2"]
    model = dt.attach(toy.base(), BitFitConfig())
    base_biases = {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith("base_layer.bias")}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    model.train()
    model(**toy.loss_batch()).loss.backward()
    optimizer.step()
    deltas = [p for n, p in model.named_parameters() if "bias_delta" in n]
    assert any(bool(p.abs().sum() > 0) for p in deltas)
    for n, p in model.named_parameters():
        if n in base_biases:
            assert torch.equal(p, base_biases[n]), n


# --- with LoRA ------------------------------------------------------------------------------

def test_lora_on_q_v_and_bitfit_on_the_other_biases_match_the_hand_formulas():
    toy = contract.TOYS["bert"]
    model = dt.attach(toy.base(), dt.LoraConfig(r=2, alpha=4, targets=["q", "v"]), name="lora")
    model.add(BitFitConfig(exclude=["query", "value"], modules_to_save=[]), name="bias")
    model.use(["lora", "bias"])
    contract.perturbed(model)
    combined = contract.logits(model, toy.loss_batch())

    reference = toy.base()
    reference.classifier.load_state_dict(model.base_model.classifier.modules_to_save["lora"].state_dict())
    layers = dict(model.adapter_layers())
    with torch.no_grad():
        for path, module in reference.named_modules():
            layer = layers.get(path)
            if hasattr(layer, "lora_A"):
                module.weight += layer.scaling["lora"] * layer.lora_B["lora"].weight @ layer.lora_A["lora"].weight
            elif isinstance(layer, BitFitLayer):
                module.bias += layer.bias_delta["bias"]
    torch.testing.assert_close(combined, contract.logits(reference, toy.loss_batch()), atol=1e-5, rtol=0)
    model.merge()
    torch.testing.assert_close(contract.logits(model, toy.loss_batch()), combined, atol=1e-4, rtol=0)


def test_bitfit_on_a_module_lora_already_wraps_is_an_error_naming_it():
    model = dt.attach(contract.TOYS["bert"].base(), dt.LoraConfig(targets=["q", "v"]), name="lora")
    with pytest.raises(dt.TargetError, match=r"bert\.encoder\.layer\.0\.attention\.self\.query already carries"):
        model.add(BitFitConfig(), name="bias")
    assert model.adapter_names == ["lora"]


# --- it learns ------------------------------------------------------------------------------

def test_bitfit_beats_untrained_minilm():
    run = train_briefly(BitFitConfig(), steps=60, lr=3e-3)
    assert run.accuracy_after > run.accuracy_before + 0.10, run
