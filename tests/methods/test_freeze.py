"""Layer freezing and the head-only / full baselines: the shared contract (merge included) on the
four toys, which modules each selection trains, tied weights, combinations, and training."""

from __future__ import annotations

import json

import pytest
import torch

import deltatune as dt
from deltatune.core import registry
from deltatune.core.layer import ModulesToSave
from deltatune.methods.freeze import FreezeConfig, FullConfig, HeadOnlyConfig
from tests.methods import contract
from tests.methods.short_training import train_briefly

TOYS = contract.TOYS

# the top two blocks of each toy, by hand (T5's stacks have two blocks each)
UPPER_2 = {
    "bert": ["bert.encoder.layer.2", "bert.encoder.layer.3"],
    "gpt2": ["transformer.h.2", "transformer.h.3"],
    "llama": ["model.layers.2", "model.layers.3"],
    "t5": ["encoder.block.0", "encoder.block.1", "decoder.block.0", "decoder.block.1"],
}
HEAD = {"bert": "classifier", "gpt2": "lm_head", "llama": "lm_head", "t5": "lm_head"}
CONFIGS = {"upper:2": FreezeConfig(train="upper:2"), "head-only": HeadOnlyConfig(), "full": FullConfig()}


def numel(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def expected_trainable(name: str, toy: str, base: torch.nn.Module) -> int:
    head = numel(base.get_submodule(HEAD[toy]))
    if name == "upper:2":
        return sum(numel(base.get_submodule(p)) for p in UPPER_2[toy]) + (head if toy == "bert" else 0)
    if name == "head-only":
        return head  # for the LM toys a copy of the (tied) output head
    return numel(base)  # full: every parameter once, tied weights staying tied


def _trained_paths(model: dt.AdaptedModel, adapter: str = "default") -> list[str]:
    return [p for p, layer in model.adapter_layers() if isinstance(layer, ModulesToSave) and adapter in layer.adapter_names]


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("toy", TOYS.values(), ids=TOYS.keys())
def test_freeze_contract(toy, name, tmp_path):
    cfg = CONFIGS[name]
    contract.check_only_adapter_parameters_train(toy, cfg)
    contract.check_changes_and_disables(toy, cfg)
    contract.check_save_load(toy, cfg, tmp_path)
    contract.check_merge(toy, cfg)
    contract.check_remove_restores_base(toy, cfg)
    if toy.name != "bert" and name != "head-only":  # copies of blocks that a key/value cache runs through
        contract.check_mixed_batch(toy, cfg, refused="key/value cache")
        contract.check_mixed_batch(toy, cfg, use_cache=False)
    else:
        contract.check_mixed_batch(toy, cfg)
    contract.check_trainable_count(toy, cfg, expected_trainable(name, toy.name, toy.base()))


@pytest.mark.parametrize("toy", TOYS.values(), ids=TOYS.keys())
def test_upper_2_trains_exactly_the_top_two_blocks(toy):
    model = dt.attach(toy.base(), FreezeConfig(train="upper:2"))
    expected = UPPER_2[toy.name] + (["classifier"] if toy.name == "bert" else [])
    assert _trained_paths(model) == expected
    trainable = [n for n, p in model.base_model.named_parameters() if p.requires_grad]
    assert all(any(n.startswith(f"{p}.modules_to_save.default.") for p in expected) for n in trainable)


def test_upper_1_takes_the_top_block_of_each_t5_stack():
    model = dt.attach(TOYS["t5"].base(), FreezeConfig(train="upper:1"))
    assert _trained_paths(model) == ["encoder.block.1", "decoder.block.1"]


def test_a_training_step_changes_only_the_chosen_blocks():
    toy = TOYS["llama"]
    model = dt.attach(toy.base(), FreezeConfig(train=[0, 2]))
    assert _trained_paths(model) == ["model.layers.0", "model.layers.2"]
    before = {n: p.detach().clone() for n, p in model.base_model.named_parameters()}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model.train()
    model(**toy.loss_batch()).loss.backward()
    optimizer.step()
    changed = {n for n, p in model.base_model.named_parameters() if not torch.equal(p, before[n])}
    assert changed, "nothing trained"
    assert all(n.startswith(("model.layers.0.modules_to_save.", "model.layers.2.modules_to_save.")) for n in changed)
    assert any(n.startswith("model.layers.0.") for n in changed) and any(n.startswith("model.layers.2.") for n in changed)


def test_head_only_trains_only_the_classifier():
    model = dt.attach(TOYS["bert"].base(), HeadOnlyConfig())
    trainable = {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}
    assert set(trainable) == {"base_model.classifier.modules_to_save.default.weight",
                              "base_model.classifier.modules_to_save.default.bias"}
    assert sum(trainable.values()) == 32 * 3 + 3


def test_full_counts_the_model_once_not_its_kept_originals_twice():
    """Full fine-tuning on the toy BERT: every parameter has a trained copy, so all the base's
    parameters train; the total is the base once plus the classifier's frozen original, which
    every method's count keeps beside the head's trained copy (as peft counts it)."""
    base = TOYS["bert"].base()
    base_total = sum(p.numel() for p in base.parameters())
    head = 32 * 3 + 3
    assert dt.attach(base, FullConfig()).parameter_counts() == (base_total, base_total + head)
    gpt2 = TOYS["gpt2"].base()  # no head to save; wte and lm_head tied, counted once
    gpt2_total = sum(p.numel() for p in gpt2.parameters())
    assert dt.attach(gpt2, FullConfig()).parameter_counts() == (gpt2_total, gpt2_total)
    lower = dt.attach(TOYS["bert"].base(), FreezeConfig(train="lower:1", modules_to_save=[]))
    block = sum(p.numel() for p in TOYS["bert"].base().bert.encoder.layer[0].parameters())
    assert lower.parameter_counts() == (block, base_total)


def test_embeddings_selection_per_architecture():
    picks = {name: _trained_paths(dt.attach(toy.base(), FreezeConfig(train="embeddings", modules_to_save=[])))
             for name, toy in TOYS.items()}
    assert picks == {"bert": ["bert.embeddings"], "gpt2": ["transformer.wte", "transformer.wpe"],
                     "llama": ["model.embed_tokens"],
                     "t5": ["shared", "encoder.embed_tokens", "decoder.embed_tokens"]}


def test_tied_weights_stay_tied_in_the_copies():
    gpt2 = dt.attach(TOYS["gpt2"].base(), FullConfig())
    wte = gpt2.base_model.transformer.modules_to_save["default"].wte.weight
    assert gpt2.base_model.lm_head.modules_to_save["default"].weight is wte
    assert wte is not gpt2.base_model.transformer.base_layer.wte.weight
    t5 = dt.attach(TOYS["t5"].base(), FreezeConfig(train="embeddings"))
    copies = [t5.base_model.get_submodule(p).modules_to_save["default"].weight
              for p in ("shared", "encoder.embed_tokens", "decoder.embed_tokens")]
    assert copies[0] is copies[1] is copies[2]


def test_combined_selection_and_merge_and_unload_returns_the_trained_copies():
    toy = TOYS["gpt2"]
    model = contract.perturbed(dt.attach(toy.base(), FreezeConfig(train="upper:1,embeddings,head")))
    assert _trained_paths(model) == ["transformer.wte", "transformer.wpe", "transformer.h.3", "lm_head"]
    trained = model.base_model.transformer.h[3].modules_to_save["default"]
    expected = contract.logits(model, toy.loss_batch())
    plain = model.merge_and_unload()
    assert plain.transformer.h[3] is trained
    torch.testing.assert_close(contract.logits(plain, toy.loss_batch()), expected, atol=0, rtol=0)


@pytest.mark.parametrize("train, parsed", [
    ("upper:2", ("upper:2",)), ("upper:2, head", ("upper:2", "head")), (3, (3,)), ("0,3", (0, 3)),
    ([1, "embeddings", 1], (1, "embeddings")), ("all", ("all",)),
])
def test_train_parsing(train, parsed):
    assert FreezeConfig(train=train).train == parsed


@pytest.mark.parametrize("train", ["upper:0", "middle:2", "top", -1, [], [True], 2.5])
def test_train_validation(train):
    with pytest.raises(dt.ConfigError, match="train|block|selects|upper"):
        FreezeConfig(train=train)


def test_missing_blocks_are_a_clear_error():
    with pytest.raises(dt.TargetError, match=r"numbered 0\.\.3"):
        dt.attach(TOYS["bert"].base(), FreezeConfig(train=[4]))
    with pytest.raises(dt.TargetError, match="has 4"):
        dt.attach(TOYS["bert"].base(), FreezeConfig(train="lower:5"))


def test_presets_are_registered_and_fixed(tmp_path):
    assert registry.get("head-only").config_cls is HeadOnlyConfig
    assert registry.get("full").config_cls is FullConfig
    assert registry.get("freeze").config_cls is FreezeConfig
    with pytest.raises(dt.ConfigError, match="FreezeConfig"):
        HeadOnlyConfig(train="upper:2")
    toy = TOYS["bert"]
    contract.perturbed(dt.attach(toy.base(), HeadOnlyConfig())).save(tmp_path)
    data = json.loads((tmp_path / "adapter_config.json").read_text())
    assert data["deltatune_method"] == "head-only"
    assert isinstance(dt.load(toy.base(), tmp_path).configs["default"], HeadOnlyConfig)


def test_lora_with_a_trainable_head():
    toy = TOYS["bert"]
    model = dt.attach(toy.base(), dt.LoraConfig(r=2, targets=["q", "v"]))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    heads = [n for n in trainable if ".classifier.modules_to_save.default." in n]
    loras = [n for n in trainable if ".lora_" in n]
    assert len(heads) == 2 and len(loras) == 4 * 2 * 2 and len(trainable) == len(heads) + len(loras)
    model.train()
    model(**toy.loss_batch()).loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0
               for n, p in model.named_parameters() if n in heads or ".lora_B." in n)


def test_freeze_refuses_modules_holding_other_adapters():
    model = dt.attach(TOYS["llama"].base(), dt.LoraConfig(r=2, targets=["q"], layers=[3]), "lora")
    with pytest.raises(dt.TargetError, match=r"model\.layers\.3 contains model\.layers\.3\.self_attn\.q_proj, which "
                                             r"carries a LoraLinear adapter; freeze .* disjoint modules"):
        model.add(FreezeConfig(train="upper:1"), "freeze")
    model.add(FreezeConfig(train="lower:2"), "freeze")  # disjoint blocks are fine
    assert _trained_paths(model, "freeze") == ["model.layers.0", "model.layers.1"]


def test_freeze_refuses_a_module_another_method_wraps():
    model = dt.attach(TOYS["gpt2"].base(), dt.LoraConfig(r=2, targets=["wte"]), "lora")
    with pytest.raises(dt.TargetError, match=r"transformer\.wte already carries a LoraEmbedding adapter; freeze "
                                             r"cannot wrap it too: give the two adapters disjoint modules"):
        model.add(FreezeConfig(train="embeddings"), "freeze")
    assert model.adapter_names == ["lora"] and not _trained_paths(model, "freeze")


def test_freezing_learns_sst2_on_minilm():
    run = train_briefly(FreezeConfig(train="upper:1"), steps=60, lr=1e-4)
    assert run.accuracy_after > run.accuracy_before + 0.10, run
