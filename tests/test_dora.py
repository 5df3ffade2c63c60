"""DoRA (weight-decomposed LoRA; its method contract is in tests/test_lora_init.py): peft files both ways with
equal outputs, the same gradients as peft's DoRA, exact merge/unmerge, mixed batches, a 4-bit base."""

from __future__ import annotations

import pytest
import torch

import deltatune as dt
from tests.methods import contract
from tests.test_compose import NAMES, one_by_one, rows_of
from tests.toy_models import TOYS, assert_differs, assert_same, logits, peft_lora, randomize

pytestmark = pytest.mark.usefixtures("one_thread")

R, ALPHA = 4, 8
# (deltatune targets, peft's arguments): embeddings, GPT-2 Conv1D and plain Linear layers
CASES = {
    "llama-linear-and-embeddings": ("llama", ["q", "v", "down", "embed_tokens"],
                                    {"target_modules": ["q_proj", "v_proj", "down_proj", "embed_tokens"]}),
    "gpt2-conv1d": ("gpt2", ["q", "o", "up"], {"target_modules": ["c_attn", "c_proj", "c_fc"], "fan_in_fan_out": True}),
    "bert-with-head": ("bert", ["q", "v", "word_embeddings"], {"target_modules": ["query", "value", "word_embeddings"]}),
}


def _magnitude(name: str) -> bool:
    return "lora_magnitude_vector" in name


def peft_dora(case: str):
    """peft's DoRA adapter, factors random and magnitudes moved off their initial norms."""
    toy, _, peft_kwargs = CASES[case]
    model = peft_lora(TOYS[toy], TOYS[toy].base(), r=R, lora_alpha=ALPHA, init_lora_weights=False, use_dora=True,
                      **peft_kwargs)
    randomize(model, only=_magnitude, scale=0.1, seed=3)
    return randomize(model, only=lambda n: ".modules_to_save." in n).eval()


@pytest.mark.parametrize("case", CASES)
def test_peft_dora_folder_loads_with_equal_outputs_and_ours_loads_in_peft(case, tmp_path):
    import peft
    toy = TOYS[CASES[case][0]]
    batch = toy.batch()
    reference = peft_dora(case)
    expected = logits(reference, batch)
    assert_differs(expected, logits(toy.base(), batch))
    reference.save_pretrained(tmp_path / "peft")

    ours = dt.load(toy.base(), tmp_path / "peft").eval()
    assert ours.configs["default"].dora
    assert_same(logits(ours, batch), expected, atol=1e-5)

    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():  # move our copy, so the way back shows our tensors, not peft's
        for name, p in ours.named_parameters():
            if _magnitude(name):
                p.add_(torch.randn(p.shape, generator=gen) * 0.5)
    moved = logits(ours, batch)
    assert_differs(moved, expected)
    ours.save(tmp_path / "ours")
    back = peft.PeftModel.from_pretrained(toy.base(), tmp_path / "ours").eval()
    assert_same(logits(back, batch), moved, atol=1e-5)


@pytest.mark.parametrize("case", ["llama-linear-and-embeddings", "gpt2-conv1d"])
def test_dora_gradients_equal_peft_dora(case, tmp_path):
    toy = TOYS[CASES[case][0]]
    reference = peft_dora(case).train()
    reference.save_pretrained(tmp_path)
    ours = dt.load(toy.base(), tmp_path, trainable=True).train()
    ours.cpu_dropout = False  # torch's dropout masks, as peft's model draws them
    for model in (reference, ours):
        torch.manual_seed(0)  # the same dropout masks in the base model
        model(**toy.loss_batch()).loss.backward()
    theirs = {n.removeprefix("base_model.model."): p.grad for n, p in reference.named_parameters() if p.requires_grad}
    mine = {n.removeprefix("base_model."): p.grad for n, p in ours.named_parameters() if p.requires_grad}
    mine = {n.replace(".lora_magnitude_vector.default", ".lora_magnitude_vector.default.weight"): g
            for n, g in mine.items()}
    assert set(mine) == set(theirs) and any(_magnitude(n) for n in mine)
    for name, grad in theirs.items():
        assert_same(mine[name], grad, atol=1e-5)


def test_merge_and_unmerge_are_exact_with_a_dora_and_a_plain_adapter_merged_in_turn():
    toy = contract.TOYS["llama"]
    model = dt.attach(toy.base(), dt.LoraConfig(r=4, targets=["q", "v"], dora=True, init="random"), name="d")
    model.add(dt.LoraConfig(r=2, targets=["q", "o"], init="random"), name="p")
    contract.perturbed(model)
    weight = model.base_model.model.layers[0].self_attn.q_proj.base_layer.weight.detach().clone()
    for name in ("d", "p"):
        model.use(name)
        alone = logits(model, toy.loss_batch())
        model.merge()
        assert_same(logits(model, toy.loss_batch()), alone, atol=1e-5)
        model.unmerge()
    model.merge(["d"])
    model.merge(["p"])
    model.unmerge()
    # unmerging divides by the merge's column scale, which scales float rounding by 1/c
    assert_same(model.base_model.model.layers[0].self_attn.q_proj.base_layer.weight, weight, atol=2e-5)


@pytest.mark.parametrize("gather", [False, True], ids=["segments", "gathered"])
def test_mixed_batch_with_dora_equals_each_row_alone(gather, monkeypatch):
    from deltatune.core import routing
    toy = contract.TOYS["llama"]
    model = dt.attach(toy.base(), dt.LoraConfig(r=4, targets=["q", "v", "embed_tokens"], dora=True, init="random"),
                      name="a")
    model.add(dt.LoraConfig(r=2, targets=["q", "v", "o"], init="random"), name="b")
    model.use(["a", "b"])
    contract.perturbed(model)
    original = routing.RowRouting.__init__
    monkeypatch.setattr(routing.RowRouting, "__init__",
                        lambda self, names, device="cpu", gather_=None: original(self, names, device, gather))
    batch = rows_of(toy)
    with torch.no_grad():
        mixed = model(**batch, adapter_names=NAMES).logits
    torch.testing.assert_close(mixed, one_by_one(model, batch, NAMES), atol=1e-5, rtol=1e-5)


def test_dora_on_a_4bit_base_equals_dora_on_its_dequantized_weights(tmp_path):
    pytest.importorskip("bitsandbytes", reason="QLoRA needs bitsandbytes (the quant extra)")
    from tests.test_qlora import dequantized_twin, ids, tiny_llama
    quantized = dt.quantize(tiny_llama(), bits=4)
    twin = dequantized_twin(quantized)
    model = dt.attach(quantized, dt.LoraConfig(r=4, targets=["q", "v", "down"], dora=True, init="random")).train()
    model(input_ids=ids(), labels=ids()).loss.backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if _magnitude(n))
    contract.perturbed(model)
    model.save(tmp_path)
    on_twin = dt.load(twin, tmp_path).eval()
    torch.testing.assert_close(logits(on_twin, {"input_ids": ids()}), logits(model, {"input_ids": ids()}),
                               atol=1e-5, rtol=1e-5)


def test_dora_refuses_a_conv2d_target_before_wrapping_anything():
    from tests.toy_models import layer_zoo, module_types
    base = layer_zoo()
    before = module_types(base)
    with pytest.raises(dt.TargetError, match="DoRA works on Linear, Conv1D and Embedding"):
        dt.attach(base, dt.LoraConfig(r=2, targets=["emb", "conv3"], dora=True))
    assert module_types(base) == before
    with pytest.raises(dt.ConfigError, match="dora must be true or false"):
        dt.LoraConfig(dora="yes")
