"""Subspace similarity and amplification (Hu et al. 2021, section 7) against hand-computed
numbers, on real adapter files of the toy BERT, and the parameter / memory table."""

from __future__ import annotations

import json
import math
import re
import struct

import pytest
import torch

import deltatune as dt
from deltatune.cli import main
from deltatune.errors import ConfigError
from deltatune.experiments import subspace
from deltatune.experiments.params import recipe_params
from deltatune.experiments.subspace import (adapter_amplification, amplification, compare_adapters, read_lora_a,
                                            similarity, similarity_grid)


def e(n: int, *idx: int) -> torch.Tensor:
    """Rows of the identity: the unit vectors e_idx in R^n."""
    return torch.eye(n)[list(idx)]


# --- subspace similarity ---------------------------------------------------------------------

def test_identical_adapters_are_fully_similar_at_every_i_j():
    a = torch.randn(4, 10)
    assert similarity(a, a) == pytest.approx(1.0)
    grid = similarity_grid(a, a)
    assert len(grid) == 4 and len(grid[0]) == 4
    assert all(v == pytest.approx(1.0) for row in grid for v in row)


def test_orthogonal_adapters_have_zero_similarity():
    assert similarity(e(6, 0, 1), e(6, 2, 3, 4)) == pytest.approx(0.0, abs=1e-12)


def test_similarity_of_a_line_at_45_degrees_is_one_half():
    """span{e1} vs span{(e1 + e2) / sqrt 2}: cos^2(45°) = 0.5."""
    assert similarity(e(3, 0), (e(3, 0) + e(3, 1)) * 3.0) == pytest.approx(0.5)


def test_similarity_ignores_scaling_and_mixing_of_the_rows():
    """Only the row space counts: A2 = M A1 with M invertible spans the same subspace."""
    a1 = torch.randn(3, 8)
    mix = torch.tensor([[2.0, 1.0, 0.0], [0.0, 1.0, 1.0], [1.0, 0.0, 3.0]])
    assert similarity(a1, mix @ a1) == pytest.approx(1.0)


def test_similarity_of_nested_subspaces_and_normalisation_by_min_i_j():
    """A1 = e1 (rank 1) lies inside A2 = span{e1, e2, e3} (rank 3): phi(1, 3) = 1 / min(1, 3) = 1.
    A1 = span{e1, e2} vs A2 = span{e2, e3}: ||U^T V||_F^2 = 1 shared direction, / min(2, 2) = 0.5."""
    assert similarity(e(5, 0), e(5, 0, 1, 2)) == pytest.approx(1.0)
    assert similarity(e(5, 0, 1), e(5, 1, 2)) == pytest.approx(0.5)


def test_similarity_grid_matches_the_definition_at_each_i_j():
    a1, a2 = torch.randn(3, 12), torch.randn(5, 12)
    grid = similarity_grid(a1, a2)
    for i in range(1, 4):
        for j in range(1, 6):
            assert grid[i - 1][j - 1] == pytest.approx(similarity(a1, a2, i, j))
    with pytest.raises(ConfigError, match="i and j"):
        similarity(a1, a2, 4, 1)
    with pytest.raises(ConfigError, match="different input sizes"):
        similarity(a1, torch.randn(2, 5))


# --- amplification ---------------------------------------------------------------------------

def test_amplification_of_a_weak_direction_by_hand():
    """W = diag(10, 5, 1, 0.5); dW = 2 e3 e3^T boosts W's third direction (singular value 1):
    ||U^T W V|| = 1, ||dW|| = 2, factor 2; W's own top-1 direction gives 10."""
    w = torch.diag(torch.tensor([10.0, 5.0, 1.0, 0.5]))
    dw = 2.0 * torch.outer(e(4, 2)[0], e(4, 2)[0])
    out = amplification(w, dw)
    assert out["r"] == 1
    assert out["w_on_delta"] == pytest.approx(1.0)
    assert out["delta_norm"] == pytest.approx(2.0)
    assert out["factor"] == pytest.approx(2.0)
    assert out["w_on_top"] == pytest.approx(10.0)


def test_amplification_random_directions_of_a_scaled_identity():
    """For W = c I (n x n) and r = n random orthonormal directions, ||U^T W V||_F = c ||U^T V||_F
    = c sqrt(n) whatever U and V are; W's top-2 directions give c sqrt(2)."""
    w = 3.0 * torch.eye(6)
    out = amplification(w, torch.randn(6, 6), r=6, seed=5)
    assert out["w_on_random"] == pytest.approx(3.0 * math.sqrt(6))
    assert amplification(w, torch.randn(6, 6), r=2)["w_on_top"] == pytest.approx(3.0 * math.sqrt(2))


def test_amplification_rank_two_update_inside_w_top_directions():
    """dW along W's two strongest directions: ||U^T W V||_F = sqrt(10^2 + 5^2)."""
    w = torch.diag(torch.tensor([10.0, 5.0, 1.0, 0.5]))
    dw = torch.diag(torch.tensor([0.3, 0.2, 0.0, 0.0]))
    out = amplification(w, dw)
    assert out["r"] == 2 and out["w_on_delta"] == pytest.approx(math.sqrt(125))
    assert out["factor"] == pytest.approx(math.sqrt(0.13) / math.sqrt(125))


# --- on adapter files ------------------------------------------------------------------------

def save_lora(toy_models, folder, r, seed):
    torch.manual_seed(seed)
    base = dt.load_model(toy_models["bert"], num_labels=2)
    model = dt.attach(base, dt.LoraConfig(r=r, alpha=2 * r, targets=["q", "v"], init="gaussian"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    model.save(str(folder))
    return model


def test_subspace_of_adapter_files(toy_models, tmp_path):
    save_lora(toy_models, tmp_path / "a", 4, seed=0)
    save_lora(toy_models, tmp_path / "b", 2, seed=1)
    a, b = read_lora_a(tmp_path / "a"), read_lora_a(tmp_path / "b")
    assert len(a) == 4 and all(t.shape == (4, 32) for t in a.values())
    same = compare_adapters(tmp_path / "a", tmp_path / "a")
    assert same["mean_phi"] == pytest.approx(1.0) and len(same["modules"]) == 4
    result = compare_adapters(tmp_path / "a", tmp_path / "b", out=tmp_path / "plots")
    for m in result["modules"]:
        assert (m["i"], m["j"]) == (4, 2)
        assert m["phi"] == pytest.approx(similarity(a[m["module"]], b[m["module"]]))
        assert {m["kind"] for m in result["modules"]} == {"query", "value"}
    assert (tmp_path / "plots" / "phi_by_layer.png").stat().st_size > 0
    assert json.loads((tmp_path / "plots" / "subspace.json").read_text())["mean_phi"] == pytest.approx(result["mean_phi"])
    assert main(["analyze", "subspace", str(tmp_path / "a"), str(tmp_path / "b"), "--i", "1", "--j", "1"]) == 0


def test_compare_adapters_takes_one_svd_per_a_matrix_and_keeps_the_numbers(toy_models, tmp_path, monkeypatch):
    """phi and the phi grid share each A's singular vectors: two SVDs per module, and exactly the
    numbers similarity() and similarity_grid() give on their own."""
    save_lora(toy_models, tmp_path / "a", 4, seed=0)
    save_lora(toy_models, tmp_path / "b", 2, seed=1)
    a, b = read_lora_a(tmp_path / "a"), read_lora_a(tmp_path / "b")
    expected = {name: (similarity(a[name], b[name], 3, 2), similarity_grid(a[name], b[name])) for name in a}
    svd, calls = subspace.right_singular_vectors, []
    monkeypatch.setattr(subspace, "right_singular_vectors", lambda m: calls.append(m) or svd(m))
    result = compare_adapters(tmp_path / "a", tmp_path / "b", i=3)
    assert len(calls) == 2 * len(result["modules"]) == 8
    for m in result["modules"]:
        assert (m["i"], m["j"]) == (3, 2)
        assert (m["phi"], m["grid"]) == expected[m["module"]]


def test_amplification_of_an_adapter_file_uses_its_delta_and_base_weight(toy_models, tmp_path):
    model = save_lora(toy_models, tmp_path / "a", 2, seed=0)
    result = adapter_amplification(tmp_path / "a", toy_models["bert"])
    assert len(result["modules"]) == 4
    layer = model.base_model.bert.encoder.layer[1].attention.self.value
    expected = amplification(layer.base_layer.weight, layer.lora_B["default"].weight @ layer.lora_A["default"].weight
                             * layer.scaling["default"], 2)
    (got,) = [m for m in result["modules"] if m["module"].endswith("layer.1.attention.self.value")]
    for key in ("delta_norm", "w_on_delta", "w_on_top", "factor"):
        assert got[key] == pytest.approx(expected[key], rel=1e-6)


def test_non_lora_adapters_are_refused(toy_models, tmp_path):
    base = dt.load_model(toy_models["bert"], num_labels=2)
    dt.attach(base, dt.IA3Config(targets=["k", "v"], feedforward=[])).save(str(tmp_path / "ia3"))
    with pytest.raises(ConfigError, match="needs LoRA"):
        read_lora_a(tmp_path / "ia3")


# --- params ----------------------------------------------------------------------------------

def safetensors_data_bytes(path) -> int:
    """File size minus the 8-byte length prefix and the JSON header: the raw tensor bytes."""
    raw = path.read_bytes()
    (header,) = struct.unpack("<Q", raw[:8])
    return len(raw) - 8 - header


def test_params_of_lora_on_the_toy_bert_by_hand(recipe, toy_models, tmp_path):
    """Toy BERT: hidden 32, 2 blocks. LoRA r=4 on q and v: 2 blocks x 2 modules x r (32 + 32)
    = 1,024, plus the classifier copy (32 x 2 + 2 = 66): 1,090 trainable. AdamW: 8 bytes each."""
    result = recipe_params(recipe(method={"type": "lora", "r": 4, "alpha": 8, "targets": ["q", "v"]}))
    trainable = 2 * 2 * 4 * (32 + 32) + (32 * 2 + 2)
    assert result["trainable_params"] == trainable == 1090
    base_total = sum(p.numel() for p in dt.load_model(toy_models["bert"], num_labels=2).parameters())
    # total counts the base model plus what the adapter adds (LoRA matrices, the head's trainable copy)
    assert result["total_params"] == base_total + trainable
    assert result["trainable_percent"] == pytest.approx(100 * trainable / result["total_params"])
    assert result["optimizer_bytes"] == 8 * 1090 and result["gradient_bytes"] == 4 * 1090
    # the file holds exactly the trainable tensors in fp32, plus its header
    model = dt.attach(dt.load_model(toy_models["bert"], num_labels=2),
                      dt.LoraConfig(r=4, alpha=8, targets=["q", "v"]))
    model.save(str(tmp_path / "a"))
    path = tmp_path / "a" / "adapter_model.safetensors"
    assert safetensors_data_bytes(path) == 4 * 1090
    assert result["file_bytes"] == path.stat().st_size


def test_params_of_head_only_and_full(recipe, toy_models, capsys):
    base_total = sum(p.numel() for p in dt.load_model(toy_models["bert"], num_labels=2).parameters())
    head = recipe_params(recipe(method={"type": "head-only"}))
    assert head["trainable_params"] == 66 and head["optimizer_bytes"] == 8 * 66
    full = recipe_params(recipe(method={"type": "full"}))
    assert full["trainable_params"] == base_total
    assert full["file_bytes"] >= 4 * base_total  # the whole model in fp32
    assert full["trainable_percent"] == pytest.approx(100.0 * base_total / full["total_params"])


def test_params_command(recipe, tmp_path, capsys):
    import yaml

    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe()))
    assert main(["analyze", "params", str(path), "--set", "method.r=2", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["trainable_params"] == 2 * 2 * 2 * 64 + 66
    assert main(["analyze", "params", str(path)]) == 0
    text = capsys.readouterr().out
    assert re.search(r"^trainable parameters +1,090$", text, re.M)
    assert re.search(r"^AdamW state \(2 x fp32\) +8\.5 KiB \(8,720 bytes\)$", text, re.M)
