"""Diff pruning: the shared contract, the hard-concrete gate and the layer against their formulas,
the L0 penalty, the sparse file (size scales with the nonzero count, reloads exactly), mixing
with LoRA."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from transformers.pytorch_utils import Conv1D

import deltatune as dt
from deltatune.methods.diff_pruning import (DiffPruningConfig, DiffPruningLinear, expected_density, l0_penalty,
                                            sparsity)
from deltatune.methods.diff_pruning.gates import deterministic_gates, open_probability, sample_gates
from tests.methods import contract
from tests.methods.short_training import train_briefly

TOYS = pytest.mark.parametrize("toy", contract.TOYS.values(), ids=contract.TOYS.keys())

# Hand formulas for the default "all-linear" selection: 2 x (sum of targeted weight sizes), one
# diff entry and one gate log-odds per weight entry; heads excluded. Hidden 32, FFN 48, 4 blocks.
EXPECTED_COUNT = {
    # per block: q, k, v, o (4 x 32x32), intermediate + output (2 x 32x48); plus the pooler 32x32;
    # plus the trained classifier copy (32 x 3 + 3)
    "bert": 2 * (4 * (4 * 32 * 32 + 2 * 32 * 48) + 32 * 32) + (32 * 3 + 3),
    # per block: c_attn 32x96, attn c_proj 32x32, c_fc 32x128, mlp c_proj 128x32
    "gpt2": 2 * 4 * (32 * 96 + 32 * 32 + 32 * 128 + 128 * 32),
    # per block: q 32x32, k 32x16, v 32x16, o 32x32, gate/up/down 3 x 32x48
    "llama": 2 * 4 * (2 * 32 * 32 + 2 * 32 * 16 + 3 * 32 * 48),
    # encoder blocks: q k v o + wi wo; decoder blocks: two attentions + wi wo
    "t5": 2 * (2 * (4 * 32 * 32 + 2 * 32 * 48) + 2 * (8 * 32 * 32 + 2 * 32 * 48)),
}


@TOYS
def test_diff_pruning_contract(toy, tmp_path):
    config = DiffPruningConfig()
    contract.check_contract(toy, config, tmp_path)
    contract.check_trainable_count(toy, config, EXPECTED_COUNT[toy.name])


# --- the hard-concrete gate -----------------------------------------------------------------

def _sigmoid(v: float) -> float:
    return 1.0 / (1.0 + math.exp(-v))


def test_deterministic_gate_formula():
    log_alpha = torch.tensor([-5.0, -2.0, 0.0, 1.0, 2.0, 5.0])
    expected = [min(1.0, max(0.0, _sigmoid(a) * 1.2 - 0.1)) for a in log_alpha.tolist()]
    torch.testing.assert_close(deterministic_gates(log_alpha), torch.tensor(expected))
    assert deterministic_gates(log_alpha)[0] == 0.0 and deterministic_gates(log_alpha)[-1] == 1.0


def test_stochastic_gates_open_as_often_as_the_l0_formula_says():
    torch.manual_seed(0)
    values = [-2.0, 0.0, 1.5]
    samples = sample_gates(torch.tensor(values).repeat(200_000, 1))
    assert samples.min() == 0.0 and samples.max() == 1.0  # hard zeros and ones occur
    # P(z > 0) = sigmoid(log_alpha - beta * log(-l / r)) with beta 2/3, l -0.1, r 1.1
    expected = [_sigmoid(a - (2.0 / 3.0) * math.log(0.1 / 1.1)) for a in values]
    torch.testing.assert_close((samples > 0).float().mean(0), torch.tensor(expected), atol=5e-3, rtol=0)
    torch.testing.assert_close(open_probability(torch.tensor(values)), torch.tensor(expected))


# --- the layer against its formula ----------------------------------------------------------

def _layer(base: nn.Module, log_alpha: torch.Tensor | None = None) -> DiffPruningLinear:
    layer = DiffPruningLinear(base)
    layer.add_adapter("a", init_log_alpha=3.0)
    with torch.no_grad():
        layer.diff_weight["a"].normal_()
        if log_alpha is not None:
            layer.diff_log_alpha["a"].copy_(log_alpha)
    layer.set_active(["a"])
    return layer


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_eval_output_adds_the_gated_diff(kind):
    base = nn.Linear(6, 4) if kind == "linear" else Conv1D(4, 6)
    shape = base.weight.shape
    layer = _layer(base, torch.linspace(-4, 4, shape.numel()).reshape(shape)).eval()
    x = torch.randn(3, 6)
    gate = deterministic_gates(layer.diff_log_alpha["a"]).detach()
    assert 0 < int((gate == 0).sum()) < gate.numel()  # some gates shut, some open
    w = base.weight.detach() + layer.diff_weight["a"].detach() * gate  # in the layer's own layout
    expected = (x @ w + base.bias.detach()) if kind == "conv1d" else (x @ w.t() + base.bias.detach())
    torch.testing.assert_close(layer(x), expected)
    torch.testing.assert_close(layer(x), layer(x))  # deterministic


def test_training_mode_samples_the_gates():
    layer = _layer(nn.Linear(6, 4), torch.zeros(4, 6)).train()
    x = torch.randn(3, 6)
    torch.manual_seed(1)
    first = layer(x)
    assert not torch.allclose(first, layer(x))
    torch.manual_seed(1)
    torch.testing.assert_close(layer(x), first)


def test_the_diff_starts_at_zero_so_the_model_starts_as_the_base():
    toy = contract.TOYS["llama"]  # no dropout: training mode differs only in the sampled gates
    model = dt.attach(toy.base(), DiffPruningConfig()).train()
    with torch.no_grad():
        train_out = model(**{k: v for k, v in toy.loss_batch().items() if k != "labels"}).logits
    torch.testing.assert_close(train_out, contract.logits(toy.base(), toy.loss_batch()))


def test_merge_then_unmerge_restores_the_weights_bit_for_bit():
    base = nn.Linear(6, 4)
    original = base.weight.detach().clone()
    layer = _layer(base, torch.linspace(-4, 4, 24).reshape(4, 6)).eval()
    x = torch.randn(3, 6)
    expected = layer(x)
    layer.merge()
    torch.testing.assert_close(base(x), expected)
    layer.unmerge()
    assert torch.equal(base.weight, original)


# --- the sparse file ------------------------------------------------------------------------

def _with_sparsity(toy: contract.Toy, kept: float, seed: int = 0) -> dt.AdaptedModel:
    """A diff-pruned model where about ``kept`` of the gates are open (deterministic gate 1)."""
    model = dt.attach(toy.base(), DiffPruningConfig(targets=["q", "v"], modules_to_save=[]))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in model.adapter_layers():
            layer.diff_weight["default"].normal_(generator=g)
            open_ = torch.rand(layer.diff_log_alpha["default"].shape, generator=g) < kept
            layer.diff_log_alpha["default"].copy_(torch.where(open_, 5.0, -5.0))
    return model.eval()


def test_saved_file_holds_only_the_nonzero_entries_and_reloads_the_dense_diff_exactly(tmp_path):
    toy = contract.TOYS["llama"]
    model = _with_sparsity(toy, kept=0.1)
    model.save(tmp_path)
    tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
    layers = dict(model.adapter_layers())
    assert len(tensors) == 2 * len(layers)
    for path, layer in layers.items():
        diff = layer.delta_weight("default").detach()
        indices = tensors[f"base_model.model.{path}.diff_indices"]
        values = tensors[f"base_model.model.{path}.diff_values"]
        assert indices.numel() == values.numel() == int((diff != 0).sum()) < diff.numel() // 4
        assert torch.equal(diff.reshape(-1)[indices.long()], values)

    loaded = dt.load(toy.base(), tmp_path).eval()
    for path, layer in loaded.adapter_layers():
        assert torch.equal(layer.delta_weight("default"), layers[path].delta_weight("default"))
    assert torch.equal(contract.logits(loaded, toy.loss_batch()), contract.logits(model, toy.loss_batch()))
    assert sparsity(loaded) == sparsity(model)


def test_file_size_scales_with_the_nonzero_count(tmp_path):
    toy = contract.TOYS["llama"]
    sizes, nonzeros = [], []
    for i, kept in enumerate((0.02, 0.2, 0.6)):
        model = _with_sparsity(toy, kept, seed=i)
        model.save(tmp_path / str(i))
        sizes.append((tmp_path / str(i) / "adapter_model.safetensors").stat().st_size)
        nonzeros.append(sum(int((layer.delta_weight("default") != 0).sum()) for _, layer in model.adapter_layers()))
    dense_bytes = 4 * sum(layer.base_layer.weight.numel() for _, layer in model.adapter_layers())
    # 8 bytes per nonzero entry (int32 position + float32 value), plus a header of fixed size
    for a, b in ((0, 1), (1, 2)):
        assert abs((sizes[b] - sizes[a]) - 8 * (nonzeros[b] - nonzeros[a])) < 64
    assert sizes[0] < 0.2 * dense_bytes


def test_a_corrupt_sparse_file_is_refused_and_leaves_the_model_clean(tmp_path):
    from safetensors.torch import save_file

    toy = contract.TOYS["llama"]
    _with_sparsity(toy, kept=0.1).save(tmp_path)
    tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
    key = next(k for k in tensors if k.endswith("diff_indices"))
    tensors[key] = tensors[key].clone()
    tensors[key][0] = 10_000  # outside a 32x32 weight
    save_file(tensors, str(tmp_path / "adapter_model.safetensors"))
    model = dt.AdaptedModel(toy.base())
    with pytest.raises(dt.AdapterFileError, match="outside the weight"):
        model.load(tmp_path)
    assert model.adapter_names == [] and not any(isinstance(m, DiffPruningLinear) for m in model.modules())


# --- the L0 penalty -------------------------------------------------------------------------

def test_l0_penalty_matches_its_formula_and_reaches_the_log_odds():
    model = dt.attach(contract.TOYS["llama"].base(),
                      DiffPruningConfig(targets=["q", "v"], target_sparsity=0.9, l0_weight=2.0))
    log_alphas = [layer.diff_log_alpha["default"] for _, layer in model.adapter_layers()]
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for la in log_alphas:
            la.copy_(torch.rand(la.shape, generator=g) * 6 - 3)
    flat = torch.cat([la.detach().reshape(-1) for la in log_alphas])
    density = torch.sigmoid(flat - (2.0 / 3.0) * math.log(0.1 / 1.1)).mean()
    torch.testing.assert_close(expected_density(model, "default"), density)
    penalty = l0_penalty(model)
    torch.testing.assert_close(penalty, 2.0 * (density - 0.1))
    # the hook the training loop adds to its loss is the same term
    torch.testing.assert_close(model.training_penalty(), penalty)
    penalty.backward()
    assert all(la.grad is not None and bool((la.grad > 0).all()) for la in log_alphas)  # closing gates lowers it


def test_l0_penalty_is_zero_once_the_target_is_met_and_needs_a_diff_adapter():
    toy = contract.TOYS["llama"]
    model = dt.attach(toy.base(), DiffPruningConfig(targets=["v"], target_sparsity=0.5, init_log_alpha=-6.0))
    assert float(l0_penalty(model)) == 0.0
    with pytest.raises(dt.AdapterError, match="no diff-pruning adapter"):
        l0_penalty(dt.attach(toy.base(), dt.LoraConfig()))
    assert dt.attach(toy.base(), dt.LoraConfig()).training_penalty() is None  # LoRA has no regulariser


def test_training_with_the_penalty_reaches_the_target_sparsity(tmp_path):
    toy = contract.TOYS["bert"]
    model = dt.attach(toy.base(), DiffPruningConfig(targets=["q", "v"], target_sparsity=0.9, l0_weight=10.0))
    model.save(tmp_path / "before")
    gates = [p for n, p in model.named_parameters() if "diff_log_alpha" in n]
    others = [p for n, p in model.named_parameters() if p.requires_grad and "diff_log_alpha" not in n]
    # on a toy task the task gradient on the gates is tiny, so the penalty would shift every
    # log-alpha alike and close all of them together; give 15% a head start, as the entries the
    # task favours get in a real run, and those should be the ones that stay open
    g = torch.Generator().manual_seed(0)
    favoured = [torch.rand(p.shape, generator=g) < 0.15 for p in gates]
    with torch.no_grad():
        for p, mask in zip(gates, favoured):
            p.add_(mask.float() * 5.0)
    optimizer = torch.optim.Adam([{"params": others, "lr": 1e-3}, {"params": gates, "lr": 0.2}])
    assert sparsity(model) == 1.0  # the diff starts at zero
    model.train()
    for _ in range(40):
        loss = model(**toy.loss_batch()).loss + l0_penalty(model)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert float(expected_density(model, "default")) < 0.1 + 0.02
    assert 0.8 < sparsity(model) < 1.0  # most of the trained diff is pruned, not all
    layers = [layer for _, layer in model.adapter_layers()]
    for layer, mask in zip(layers, favoured):
        kept = layer.delta_weight("default") != 0
        assert not (kept & ~mask).any(), "an entry without a head start survived the penalty"
    model.save(tmp_path / "after")
    saved = load_file(str(tmp_path / "after" / "adapter_model.safetensors"))
    nonzero = sum(v.numel() for k, v in saved.items() if k.endswith("diff_values"))
    total = sum(p.numel() for p in gates)
    assert nonzero == round((1 - sparsity(model)) * total)


# --- config ---------------------------------------------------------------------------------

@pytest.mark.parametrize("bad, match", [
    ({"target_sparsity": 1.0}, "target_sparsity must be in"),
    ({"target_sparsity": -0.1}, "target_sparsity must be in"),
    ({"l0_weight": -1}, "l0_weight must be"),
    ({"init_log_alpha": float("nan")}, "init_log_alpha must be"),
    ({"targets": []}, "non-empty list"),
])
def test_invalid_configs_say_what_to_do(bad, match):
    with pytest.raises(dt.ConfigError, match=match):
        DiffPruningConfig(**bad)


def test_config_round_trips_through_its_file_form():
    config = DiffPruningConfig(targets=["q"], target_sparsity=0.99, l0_weight=0.5, init_log_alpha=2.0)
    data = config.to_dict()
    assert data["deltatune_method"] == "diff_pruning" and "peft_type" not in data
    assert DiffPruningConfig.from_dict(data) == config


# --- with LoRA ------------------------------------------------------------------------------

def test_lora_on_q_and_diff_pruning_on_v_active_together_match_the_hand_formula():
    toy = contract.TOYS["llama"]
    model = dt.attach(toy.base(), dt.LoraConfig(r=2, alpha=4, targets=["q"]), name="lora")
    model.add(DiffPruningConfig(targets=["v"]), name="diff")
    model.use(["lora", "diff"])
    contract.perturbed(model)
    combined = contract.logits(model, toy.loss_batch())
    reference = toy.base()
    layers = dict(model.adapter_layers())
    with torch.no_grad():
        for path, module in reference.named_modules():
            layer = layers.get(path)
            if hasattr(layer, "lora_A"):
                module.weight += layer.scaling["lora"] * layer.lora_B["lora"].weight @ layer.lora_A["lora"].weight
            elif isinstance(layer, DiffPruningLinear):
                module.weight += layer.diff_weight["diff"] * deterministic_gates(layer.diff_log_alpha["diff"])
    torch.testing.assert_close(combined, contract.logits(reference, toy.loss_batch()), atol=1e-5, rtol=0)


def test_diff_pruning_on_a_module_lora_wraps_is_an_error_naming_it():
    model = dt.attach(contract.TOYS["llama"].base(), dt.LoraConfig(targets=["q", "v"]), name="lora")
    with pytest.raises(dt.TargetError, match=r"model\.layers\.0\.self_attn\.q_proj already carries"):
        model.add(DiffPruningConfig(), name="diff")
    assert model.adapter_names == ["lora"]


# --- it learns ------------------------------------------------------------------------------

def test_diff_pruning_beats_untrained_minilm():
    run = train_briefly(DiffPruningConfig(targets=["q", "v"]), steps=60, lr=1e-3)
    assert run.accuracy_after > run.accuracy_before + 0.10, run
