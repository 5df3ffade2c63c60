"""(IA)^3: the shared contract on the four toys, the layer against its formula, adapter files
moving both ways between deltatune and peft with identical outputs, and mixing with LoRA."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from transformers.pytorch_utils import Conv1D

import deltatune as dt
from deltatune.methods.ia3 import IA3Config, IA3Linear
from tests.methods import contract
from tests.methods.short_training import train_briefly

PEFT_TASK = {"bert": "SEQ_CLS", "gpt2": "CAUSAL_LM", "llama": "CAUSAL_LM", "t5": "SEQ_2_SEQ_LM"}
# peft's per-architecture defaults pick the paper's k, v and FFN down projection, as IA3Config()
# does, except on BERT, where peft's suffix "output.dense" also catches attention.output.dense;
# there peft is given the same modules explicitly.
PEFT_SELECTION = {
    "bert": {"target_modules": r".*\.(attention\.self\.(key|value)|layer\.\d+\.output\.dense)",
             "feedforward_modules": r".*\.layer\.\d+\.output\.dense"},
    "gpt2": {}, "llama": {}, "t5": {},
}
TOYS = pytest.mark.parametrize("toy", contract.TOYS.values(), ids=contract.TOYS.keys())


def peft_ia3(toy: contract.Toy):
    import peft
    config = peft.IA3Config(task_type=PEFT_TASK[toy.name], **PEFT_SELECTION[toy.name])
    return peft.get_peft_model(toy.base(), config).eval()


def saved_keys(directory) -> set[str]:
    return set(load_file(str(directory / "adapter_model.safetensors")))


# --- the shared contract --------------------------------------------------------------------

@TOYS
def test_ia3_contract(toy, tmp_path):
    config = IA3Config()
    contract.check_only_adapter_parameters_train(toy, config)
    contract.check_changes_and_disables(toy, config)
    tensors = contract.check_save_load(toy, config, tmp_path)
    assert any(k.endswith(".ia3_l") for k in tensors)
    contract.check_merge(toy, config)
    contract.check_remove_restores_base(toy, config)
    contract.check_mixed_batch(toy, config)


# --- peft parity ----------------------------------------------------------------------------

@TOYS
def test_peft_adapter_loads_with_identical_outputs_and_counts(toy, tmp_path):
    theirs = contract.perturbed(peft_ia3(toy))
    expected = contract.logits(theirs, toy.loss_batch())
    theirs.save_pretrained(tmp_path)

    ours = dt.load(toy.base(), tmp_path).eval()
    torch.testing.assert_close(contract.logits(ours, toy.loss_batch()), expected, atol=1e-5, rtol=0)
    # counted as trainable adapters, the same selection has peft's parameter counts
    contract.check_trainable_count(toy, IA3Config(), peft_ia3(toy).get_nb_trainable_parameters()[0])
    assert dt.attach(toy.base(), IA3Config()).parameter_counts() == peft_ia3(toy).get_nb_trainable_parameters()


@TOYS
def test_deltatune_adapter_loads_in_peft_with_identical_outputs(toy, tmp_path):
    import peft

    ours = contract.perturbed(dt.attach(toy.base(), IA3Config()))
    expected = contract.logits(ours, toy.loss_batch())
    ours.save(tmp_path / "ours")
    peft_ia3(toy).save_pretrained(tmp_path / "theirs")
    assert saved_keys(tmp_path / "ours") == saved_keys(tmp_path / "theirs")

    theirs = peft.PeftModel.from_pretrained(toy.base(), tmp_path / "ours").eval()
    torch.testing.assert_close(contract.logits(theirs, toy.loss_batch()), expected, atol=1e-5, rtol=0)


def test_saved_config_uses_peft_field_names(tmp_path):
    model = dt.attach(contract.TOYS["gpt2"].base(), IA3Config(targets=["k", "down"]))
    model.save(tmp_path)
    data = json.loads((tmp_path / "adapter_config.json").read_text())
    assert data["peft_type"] == "IA3"
    assert data["target_modules"] == ["c_attn", "mlp.c_proj"]
    assert data["feedforward_modules"] == ["mlp.c_proj"]  # peft wants a subset of target_modules
    assert data["fan_in_fan_out"] is True  # GPT-2's Conv1D, as peft wants it
    assert data["init_ia3_weights"] is True
    assert "layers" not in data and "targets" not in data and "feedforward" not in data


def test_config_from_a_peft_file():
    config = IA3Config.from_dict({"peft_type": "IA3", "target_modules": ["k_proj", "down_proj"],
                                  "feedforward_modules": ["down_proj"], "init_ia3_weights": False,
                                  "fan_in_fan_out": False, "inference_mode": True, "peft_version": "0.21.2"})
    assert config.targets == ("k_proj", "down_proj")
    assert config.feedforward == ("down_proj",)
    assert config.init == "random"


# --- the layer against its formula ----------------------------------------------------------

def _wrapped(base: nn.Module, feedforward: bool, names=("a",)) -> IA3Linear:
    layer = IA3Linear(base)
    for name in names:
        layer.add_adapter(name, feedforward=feedforward, init="random")
    layer.set_active(names)
    return layer


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_output_scaling_scales_weight_and_bias_output(kind):
    base = nn.Linear(6, 4) if kind == "linear" else Conv1D(4, 6)  # both map 6 -> 4 features
    x = torch.randn(3, 6)
    w = base.weight.detach() if kind == "linear" else base.weight.detach().t()  # as [out, in]
    layer = _wrapped(base, feedforward=False)
    vector = layer.ia3_l["a"].detach()
    assert vector.shape == (4, 1)
    expected = vector.flatten() * (x @ w.t() + base.bias.detach())
    torch.testing.assert_close(layer(x), expected)


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_feedforward_scaling_scales_the_input(kind):
    base = nn.Linear(6, 4) if kind == "linear" else Conv1D(4, 6)
    x = torch.randn(3, 6)
    w = base.weight.detach() if kind == "linear" else base.weight.detach().t()
    layer = _wrapped(base, feedforward=True)
    vector = layer.ia3_l["a"].detach()
    assert vector.shape == (1, 6)
    expected = (x * vector.flatten()) @ w.t() + base.bias.detach()
    torch.testing.assert_close(layer(x), expected)


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
@pytest.mark.parametrize("feedforward", [False, True], ids=["output", "input"])
def test_two_adapters_multiply_and_merge_unmerge_round_trips(kind, feedforward):
    base = nn.Linear(6, 4) if kind == "linear" else Conv1D(4, 6)
    original_w, original_b = base.weight.detach().clone(), base.bias.detach().clone()
    layer = _wrapped(base, feedforward, names=("a", "b"))
    x = torch.randn(3, 6)
    both = layer(x)
    product = (layer.ia3_l["a"] * layer.ia3_l["b"]).detach().flatten()
    with torch.no_grad():
        expected = base(x * product) if feedforward else base(x) * product
    torch.testing.assert_close(both, expected)  # two active vectors act as their product

    layer.merge()
    assert layer.merged_adapters == ["a", "b"]
    torch.testing.assert_close(layer(x), both, atol=1e-5, rtol=0)
    torch.testing.assert_close(base(x), both, atol=1e-5, rtol=0)  # the plain layer now computes it
    layer.unmerge()
    torch.testing.assert_close(base.weight.detach(), original_w, atol=1e-6, rtol=0)
    torch.testing.assert_close(base.bias.detach(), original_b, atol=1e-6, rtol=0)


def test_delta_weight_is_relative_to_the_unmerged_weight():
    base = nn.Linear(5, 3)
    w = base.weight.detach().clone()
    layer = _wrapped(base, feedforward=False)
    scale = layer.ia3_l["a"].detach()
    torch.testing.assert_close(layer.delta_weight("a"), w * (scale - 1))
    layer.merge()
    torch.testing.assert_close(layer.delta_weight("a"), w * (scale - 1), atol=1e-6, rtol=0)


def test_merging_a_zero_scale_is_refused():
    layer = _wrapped(nn.Linear(5, 3), feedforward=False)
    with torch.no_grad():
        layer.ia3_l["a"][1] = 0.0
    with pytest.raises(dt.AdapterError, match="exactly 0"):
        layer.merge()
    assert layer.merged_adapters == []


def test_vectors_start_at_one_so_the_model_starts_as_the_base():
    toy = contract.TOYS["llama"]
    model = dt.attach(toy.base(), IA3Config())
    assert all(torch.equal(p, torch.ones_like(p)) for n, p in model.named_parameters() if "ia3_l" in n)
    torch.testing.assert_close(contract.logits(model, toy.loss_batch()), contract.logits(toy.base(), toy.loss_batch()))


# --- target selection -----------------------------------------------------------------------

def _feedforward_paths(model) -> list[str]:
    return [p for p, layer in model.adapter_layers() if isinstance(layer, IA3Linear) and layer.feedforward["default"]]


def test_default_targets_k_v_and_the_ffn_down_projection_which_scales_its_input():
    model = dt.attach(contract.TOYS["llama"].base(), IA3Config())
    paths = [p for p, _ in model.adapter_layers()]
    assert len(paths) == 12 and {p.rsplit(".", 1)[-1] for p in paths} == {"k_proj", "v_proj", "down_proj"}
    assert _feedforward_paths(model) == [f"model.layers.{i}.mlp.down_proj" for i in range(4)]


def test_feedforward_defaults_to_none_when_down_is_not_targeted():
    model = dt.attach(contract.TOYS["llama"].base(), IA3Config(targets=["q", "v"]))
    assert _feedforward_paths(model) == []
    model = dt.attach(contract.TOYS["llama"].base(), IA3Config(targets=["up", "down"], feedforward=[]))
    assert _feedforward_paths(model) == []


def test_feedforward_accepts_aliases_and_layer_selection_applies():
    model = dt.attach(contract.TOYS["llama"].base(), IA3Config(targets=["v", "up"], feedforward=["up"], layers=[1]))
    assert [p for p, _ in model.adapter_layers()] == ["model.layers.1.self_attn.v_proj", "model.layers.1.mlp.up_proj"]
    assert _feedforward_paths(model) == ["model.layers.1.mlp.up_proj"]


def test_feedforward_outside_the_targets_is_an_error():
    with pytest.raises(dt.TargetError, match="subset of the targets"):
        dt.attach(contract.TOYS["llama"].base(), IA3Config(targets=["k", "v"], feedforward=["down"]))


def test_saved_layer_selection_reloads_to_the_same_modules(tmp_path):
    toy = contract.TOYS["bert"]
    model = contract.perturbed(dt.attach(toy.base(), IA3Config(layers="upper")))
    model.save(tmp_path)
    data = json.loads((tmp_path / "adapter_config.json").read_text())
    assert all("layer.2" in t or "layer.3" in t for t in data["feedforward_modules"])
    loaded = dt.load(toy.base(), tmp_path).eval()
    assert [p for p, _ in loaded.adapter_layers() if "classifier" not in p] == \
        [p for p, _ in model.adapter_layers() if "classifier" not in p]
    assert _feedforward_paths(loaded) == _feedforward_paths(model)
    torch.testing.assert_close(contract.logits(loaded, toy.loss_batch()), contract.logits(model, toy.loss_batch()))


@pytest.mark.parametrize("bad, match", [
    ({"init": "zeros"}, "init must be one of"),
    ({"targets": []}, "targets must be a regex string or a non-empty list of module names"),
    ({"feedforward": [3]}, "feedforward must be"),
    ({"modules_to_save": [1]}, "modules_to_save"),
])
def test_invalid_configs_say_what_to_do(bad, match):
    with pytest.raises(dt.ConfigError, match=match):
        IA3Config(**bad)


# --- with LoRA ------------------------------------------------------------------------------

def test_lora_on_q_and_ia3_on_k_v_down_active_together_match_the_hand_formulas():
    toy = contract.TOYS["bert"]
    model = dt.attach(toy.base(), dt.LoraConfig(r=2, alpha=4, targets=["q"]), name="lora")
    model.add(IA3Config(modules_to_save=[]), name="ia3")
    model.use(["lora", "ia3"])
    contract.perturbed(model)
    combined = contract.logits(model, toy.loss_batch())

    reference = toy.base()
    # the reference takes the LoRA copy of the classifier head, the one the active "lora" adapter uses
    head = model.base_model.classifier.modules_to_save["lora"]
    reference.classifier.load_state_dict(head.state_dict())
    layers = dict(model.adapter_layers())
    with torch.no_grad():
        for path, module in reference.named_modules():
            layer = layers.get(path)
            if layer is None or not hasattr(layer, "ia3_l") and not hasattr(layer, "lora_A"):
                continue
            if hasattr(layer, "lora_A"):
                module.weight += layer.scaling["lora"] * layer.lora_B["lora"].weight @ layer.lora_A["lora"].weight
            elif layer.feedforward["ia3"]:
                module.weight *= layer.ia3_l["ia3"]  # [1, in]: scales the input columns
            else:
                module.weight *= layer.ia3_l["ia3"]  # [out, 1]: scales the output rows
                module.bias *= layer.ia3_l["ia3"].flatten()
    torch.testing.assert_close(combined, contract.logits(reference, toy.loss_batch()), atol=1e-5, rtol=0)

    model.merge()
    torch.testing.assert_close(contract.logits(model, toy.loss_batch()), combined, atol=1e-4, rtol=0)
    model.unmerge()
    model.use("ia3")
    only_ia3 = contract.logits(model, toy.loss_batch())
    assert not torch.allclose(only_ia3, combined, atol=1e-4)


@pytest.mark.parametrize("first_ia3", [True, False], ids=["ia3-then-lora", "lora-then-ia3"])
def test_the_same_module_under_two_methods_is_an_error_naming_it(first_ia3):
    model = dt.AdaptedModel(contract.TOYS["gpt2"].base())  # GPT-2 fuses q, k and v in c_attn
    configs = [IA3Config(targets=["k"]), dt.LoraConfig(targets=["q"])]
    model.add(configs[0] if first_ia3 else configs[1], name="first")
    with pytest.raises(dt.TargetError, match=r"transformer\.h\.0\.attn\.c_attn already carries"):
        model.add(configs[1] if first_ia3 else configs[0], name="second")
    assert model.adapter_names == ["first"]


# --- it learns ------------------------------------------------------------------------------

def test_ia3_beats_untrained_minilm():
    run = train_briefly(IA3Config(), steps=60, lr=3e-2)
    assert run.accuracy_after > run.accuracy_before + 0.10, run
