"""PiSSA and OLoRA initialisations (and DoRA's method contract): the contract on the toy zoo, the same starting factors
as peft, the principal part by Eckart-Young, files converted to a plain rank-2r LoRA that load in
peft (and peft's PiSSA/OLoRA files that load here) with equal outputs."""

from __future__ import annotations

import json

import pytest
import torch

import deltatune as dt
from tests.methods import contract
from tests.test_compose import NAMES, one_by_one, rows_of
from tests.toy_models import TOYS, assert_differs, assert_same, layer_zoo, logits, peft_lora, randomize

pytestmark = pytest.mark.usefixtures("one_thread")

CASES = {  # (toy, deltatune targets, peft's arguments)
    "llama": ("llama", ["q", "v", "down"], {"target_modules": ["q_proj", "v_proj", "down_proj"]}),
    "gpt2-conv1d": ("gpt2", ["q", "o"], {"target_modules": ["c_attn", "c_proj"], "fan_in_fan_out": True}),
}
# peft's OLoRA factors GPT-2's Conv1D weight in its stored [in, out] layout, which gives factors of
# the wrong shape; deltatune factors [out, in] like every other layer, so OLoRA is compared on Linear
PARITY = [("pissa", "llama"), ("pissa", "gpt2-conv1d"), ("olora", "llama")]


@pytest.mark.parametrize("variant", [{"dora": True}, {"init": "pissa"}, {"init": "olora"}],
                         ids=["dora", "pissa", "olora"])
@pytest.mark.parametrize("toy", contract.TOYS.values(), ids=contract.TOYS.keys())
def test_lora_variant_contract(toy, variant, tmp_path):
    """DoRA and the data-driven initialisations through the shared method contract."""
    config = dt.LoraConfig(r=4, alpha=8, targets=["q", "v"], **variant)
    contract.check_only_adapter_parameters_train(toy, config)
    contract.check_changes_and_disables(toy, config)
    contract.check_save_load(toy, config, tmp_path)
    contract.check_merge(toy, config)
    contract.check_remove_restores_base(toy, config)


@pytest.mark.parametrize("init", ["pissa", "olora", "pissa_niter_3"])
def test_the_adapter_starts_as_the_base_model(init):
    toy = TOYS["llama"]
    model = dt.attach(toy.base(), dt.LoraConfig(r=4, alpha=8, targets=["q", "v", "down"], init=init)).eval()
    assert_same(logits(model, toy.batch()), logits(toy.base(), toy.batch()), atol=1e-5)
    layer = model.base_model.model.layers[0].self_attn.q_proj
    assert layer.lora_B["default"].weight.abs().max() > 1e-2  # B starts on W, not at zero


@pytest.mark.parametrize(("init", "case"), PARITY)
def test_starting_factors_equal_peft_and_files_move_both_ways(init, case, tmp_path):
    import peft
    toy_name, targets, peft_kwargs = CASES[case]
    toy = TOYS[toy_name]
    batch = toy.batch()
    reference = peft_lora(toy, toy.base(), r=4, lora_alpha=8, init_lora_weights=init, **peft_kwargs)
    ours = dt.attach(toy.base(), dt.LoraConfig(r=4, alpha=8, targets=targets, init=init))
    theirs_a = {n.removeprefix("base_model.model."): p for n, p in reference.named_parameters() if "lora_" in n}
    for name, p in ours.named_parameters():
        if p.requires_grad:
            assert_same(p, theirs_a[name.removeprefix("base_model.")], atol=1e-5)

    randomize(ours, scale=0.1)
    expected = logits(ours.eval(), batch)
    assert_differs(expected, logits(toy.base(), batch))
    ours.save(tmp_path / "ours")
    saved = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert (saved["r"], saved["lora_alpha"], saved["init_lora_weights"]) == (8, 16, True)
    back = peft.PeftModel.from_pretrained(toy.base(), tmp_path / "ours").eval()
    assert_same(logits(back, batch), expected, atol=1e-5)

    randomize(reference, scale=0.1, seed=9)  # peft's own (unconverted) PiSSA/OLoRA file
    reference.save_pretrained(tmp_path / "peft")
    loaded = dt.load(toy.base(), tmp_path / "peft").eval()
    assert_same(logits(loaded, batch), logits(reference, batch), atol=1e-5)


@pytest.mark.parametrize(("init", "case"), PARITY)
def test_first_gradients_equal_peft_with_its_residual_base(init, case):
    """Keeping W and subtracting the frozen s B0 A0 trains like peft's residual base W - s B0 A0 plus s B A:
    the same loss and the same gradients on A and B (so the scale s enters both alike)."""
    toy_name, targets, peft_kwargs = CASES[case]
    toy = TOYS[toy_name]
    batch = toy.loss_batch()
    reference = peft_lora(toy, toy.base(), r=4, lora_alpha=8, init_lora_weights=init, **peft_kwargs)
    ours = dt.attach(toy.base(), dt.LoraConfig(r=4, alpha=8, targets=targets, init=init)).eval()
    loss, expected_loss = ours(**batch).loss, reference(**batch).loss
    assert loss.item() == pytest.approx(expected_loss.item(), abs=1e-5)
    loss.backward()
    expected_loss.backward()
    theirs = {n.removeprefix("base_model.model."): p for n, p in reference.named_parameters() if "lora_" in n}
    mine = {n.removeprefix("base_model."): p for n, p in ours.named_parameters() if p.requires_grad}
    assert mine.keys() <= theirs.keys()  # peft's "c_proj" also takes GPT-2's MLP projection
    for name, p in mine.items():
        assert theirs[name].grad.abs().max() > 1e-6, name  # a gradient that is there to compare
        assert_same(p.grad, theirs[name].grad, atol=1e-5 * float(theirs[name].grad.abs().max()))


def test_pissa_takes_the_best_rank_r_part_and_the_fast_svd_comes_close():
    base = TOYS["llama"].base()
    weight = base.model.layers[0].mlp.down_proj.weight.detach()
    singular = torch.linalg.svdvals(weight)
    for init, slack in (("pissa", 1e-4), ("pissa_niter_8", 0.1)):
        model = dt.attach(TOYS["llama"].base(), dt.LoraConfig(r=6, alpha=3, targets=["down"], init=init))
        layer = model.base_model.model.layers[0].mlp.down_proj
        principal = (layer.lora_B["default"].weight @ layer.lora_A["default"].weight).detach() * layer.scaling["default"]
        # Eckart-Young: the residual of the best rank-6 part is the norm of the other singular values
        residual = float(torch.linalg.norm(weight - principal))
        assert residual == pytest.approx(float(singular[6:].norm()), rel=slack)


def test_mixed_batch_with_a_pissa_adapter_equals_each_row_alone():
    toy = contract.TOYS["gpt2"]
    model = dt.attach(toy.base(), dt.LoraConfig(r=4, targets=["q", "v"], init="pissa"), name="a")
    model.add(dt.LoraConfig(r=2, targets=["q", "v", "o"], init="random"), name="b")
    model.use(["a", "b"])
    contract.perturbed(model)
    batch = rows_of(toy)
    with torch.no_grad():
        mixed = model(**batch, adapter_names=NAMES).logits
    torch.testing.assert_close(mixed, one_by_one(model, batch, NAMES), atol=1e-5, rtol=1e-5)


def test_data_inits_refuse_what_they_cannot_do(tmp_path):
    with pytest.raises(dt.TargetError, match="init='olora' works on Linear and Conv1D"):
        dt.attach(layer_zoo(), dt.LoraConfig(r=2, targets=["lin", "emb"], init="olora"))
    base = layer_zoo()
    with pytest.raises(dt.ConfigError, match="r <= min"):  # conv1d passes with r=10, lin fails with 11
        dt.attach(base, dt.LoraConfig(r=10, targets=["conv1d", "lin"], init="pissa", rank_pattern={"lin": 11}))
    assert not any(isinstance(m, dt.core.layer.AdapterLayer) for m in base.modules())  # nothing wrapped
    with pytest.raises(dt.ConfigError, match="init must be one of"):
        dt.LoraConfig(init="pissa_niter_")
    toy = TOYS["llama"]
    peft_lora(toy, toy.base(), r=4, target_modules=["q_proj"], init_lora_weights="pissa_niter_2").save_pretrained(
        tmp_path)
    with pytest.raises(dt.AdapterFileError, match="randomized SVD"):
        dt.load(toy.base(), tmp_path)


@pytest.mark.parametrize("variant", [{"dora": True}, {"init": "pissa"}], ids=["dora", "pissa"])
def test_hot_swap_refuses_a_dora_or_pissa_target_and_changes_nothing(variant, tmp_path):
    toy = contract.TOYS["llama"]
    dt.attach(toy.base(), dt.LoraConfig(r=4, targets=["q", "v"], init="random")).save(tmp_path)
    model = dt.attach(toy.base(), dt.LoraConfig(r=4, targets=["q", "v"], **variant))
    before = logits(model, toy.loss_batch())
    with pytest.raises(dt.AdapterError, match="hot swap replaces plain LoRA factors"):
        model.hot_swap("default", tmp_path)
    assert_same(logits(model, toy.loss_batch()), before, atol=0)
