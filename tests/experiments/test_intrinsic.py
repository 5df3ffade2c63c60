"""Intrinsic dimension: the Fastfood projection against explicitly built matrices, subspace
training (only z trains; theta = theta0 + P z exactly), d90, and the analyze command."""

from __future__ import annotations

import copy
import json
import math
import os

import pytest
import torch

import deltatune as dt
from deltatune.cli import main
from deltatune.errors import ConfigError
from deltatune.experiments.fastfood import Fastfood, fwht, next_power_of_two
from deltatune.experiments.intrinsic import SubspaceModel, analyze, d90, format_table
from deltatune.train.optim import build_optimizer
from deltatune.train.recipe import TrainSpec


def hadamard(n: int) -> torch.Tensor:
    """Sylvester's construction, written out: H_1 = [1], H_2n = [[H, H], [H, -H]]."""
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def explicit_fastfood(ff: Fastfood) -> torch.Tensor:
    """The D x d matrix of ``ff`` built from its buffers as dense matrices, block by block."""
    n, H = ff.n, hadamard(ff.n)
    rows = []
    for k in range(ff.blocks):
        B = torch.diag(ff.signs[k].double())
        Pi = torch.zeros(n, n, dtype=torch.float64)
        Pi[torch.arange(n), ff.perm[k]] = 1.0  # (Pi x)_i = x_perm[i]
        G = torch.diag(ff.gauss[k].double())  # already divided by sqrt(n) ||G||
        rows.append(H @ G @ Pi @ H @ B)
    return torch.cat(rows, 0)[: ff.D, : ff.d]


@pytest.mark.parametrize("n", [1, 2, 8, 64])
def test_fwht_is_multiplication_by_the_hadamard_matrix(n):
    x = torch.randn(3, 5, n, dtype=torch.float64)
    torch.testing.assert_close(fwht(x), x @ hadamard(n))


def test_fwht_refuses_other_lengths():
    with pytest.raises(ConfigError, match="power-of-two"):
        fwht(torch.zeros(6))


def test_next_power_of_two():
    assert [next_power_of_two(k) for k in (1, 2, 3, 5, 8, 9, 1000)] == [1, 2, 4, 8, 8, 16, 1024]


@pytest.mark.parametrize("d, D", [(5, 30), (8, 8), (1, 3), (13, 100)])
def test_fastfood_equals_the_explicit_matrix(d, D):
    ff = Fastfood(d, D, seed=3)
    assert ff.n == next_power_of_two(d) and ff.blocks == math.ceil(D / ff.n)
    M = explicit_fastfood(ff)
    torch.testing.assert_close(ff.matrix().double(), M, atol=1e-5, rtol=1e-5)
    z = torch.randn(d)
    torch.testing.assert_close(ff(z).double(), M @ z.double(), atol=1e-5, rtol=1e-5)


def test_fastfood_blocks_have_unit_mean_square_singular_value():
    """||H G Pi H B||_F^2 = n^2 ||g||^2 (H has orthogonal rows of norm sqrt(n)), so after dividing
    by sqrt(n) ||g|| each n x n block has squared Frobenius norm exactly n."""
    ff = Fastfood(16, 16 * 5, seed=1)
    blocks = ff.matrix().double().reshape(5, 16, 16)
    for block in blocks:
        assert float((block ** 2).sum()) == pytest.approx(16.0, rel=1e-5)


def test_fastfood_is_rebuilt_from_its_seed_and_stores_no_dense_matrix():
    a, b, c = Fastfood(10, 1000, seed=0), Fastfood(10, 1000, seed=0), Fastfood(10, 1000, seed=1)
    z = torch.randn(10)
    assert torch.equal(a(z), b(z)) and not torch.equal(a(z), c(z))
    stored = sum(t.numel() for t in a.buffers())
    assert stored == 3 * a.blocks * a.n and stored < 10 * 1000  # O(D), not D x d
    with pytest.raises(ConfigError, match="length 10"):
        a(torch.zeros(11))


# --- subspace models -------------------------------------------------------------------------

@pytest.fixture
def toy_bert(toy_models):
    torch.manual_seed(0)
    return dt.load_model(toy_models["bert-nodrop"], num_labels=2)


def batch():
    torch.manual_seed(1)
    return {"input_ids": torch.randint(1000, 2000, (3, 7)), "attention_mask": torch.ones(3, 7, dtype=torch.long),
            "labels": torch.tensor([0, 1, 1])}


@pytest.mark.parametrize("said", [False, True])
def test_subspace_model_is_theta0_plus_p_z(toy_bert, said):
    reference = copy.deepcopy(toy_bert)
    sub = SubspaceModel(toy_bert, 48, said=said, exclude=["word_embeddings"], seed=2)
    names = [n for n, _ in reference.named_parameters() if "word_embeddings" not in n]
    assert sub.names == names and sub.D == sum(dict(reference.named_parameters())[n].numel() for n in names)
    assert sub.trainable() == 48
    with torch.no_grad():
        sub.z.normal_(0, 0.5)
        if said:
            sub.scales.uniform_(0.5, 1.5)
        # theta0 + lambda * P z, with P the explicit matrix, written into a plain copy
        flat = explicit_fastfood(sub.projection).float() @ sub.z
        params = dict(reference.named_parameters())
        start = 0
        for i, name in enumerate(names):
            size = params[name].numel()
            scale = sub.scales[i] if said else 1.0
            params[name].add_(scale * flat[start:start + size].view(params[name].shape))
            start += size
        reference.eval(), sub.eval()
        torch.testing.assert_close(sub(**batch()).logits, reference(**batch()).logits, atol=1e-5, rtol=1e-4)


def test_only_z_trains(toy_bert):
    before = {n: p.detach().clone() for n, p in toy_bert.named_parameters()}
    sub = SubspaceModel(toy_bert, 16)
    optimizer = build_optimizer(sub, TrainSpec(lr=0.05))
    assert [p for g in optimizer.param_groups for p in g["params"]] == [sub.z]
    assert [n for n, p in sub.named_parameters() if p.requires_grad] == ["z"]
    start = sub(**batch()).logits.detach()
    for _ in range(3):
        sub(**batch()).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert sub.z.abs().sum() > 0
    assert not torch.allclose(sub(**batch()).logits, start)
    for name, p in toy_bert.named_parameters():
        assert torch.equal(p, before[name]), name  # theta0 untouched


def test_said_needs_room_for_its_scales(toy_bert):
    tensors = len(list(toy_bert.parameters()))
    with pytest.raises(ConfigError, match=f"{tensors} projected tensors"):
        SubspaceModel(toy_bert, tensors, said=True)


def test_d90_is_the_smallest_d_reaching_90_percent():
    points = [{"d": 10, "value": 0.6}, {"d": 1000, "value": 0.85}, {"d": 100, "value": 0.82}, {"d": 50, "value": 0.79}]
    assert d90(points, reference=0.9) == 100    # needs 0.81: d=50 (0.79) misses, d=100 (0.82) reaches
    assert d90(points, reference=0.93) == 1000  # needs 0.837: only d=1000 (0.85)
    assert d90([{"d": 7, "value": 0.9}], reference=1.0) == 7  # exactly 90% counts
    assert d90(points, reference=1.0) is None


def test_analyze_intrinsic_dim_on_the_toy_model(recipe, tmp_path, capsys):
    data = recipe(train={"max_steps": 4, "eval_every": None, "lr": 0.05})
    result = analyze(data, [4, 16], out=str(tmp_path / "id"), reference=0.6, exclude=["word_embeddings"])
    assert [p["d"] for p in result["points"]] == [4, 16]
    expected = d90(result["points"], 0.6)
    assert result["d90"] == expected and result["reference"] == 0.6
    for d in (4, 16):
        summary = json.loads((tmp_path / "id" / f"d{d}" / "summary.json").read_text())
        assert summary["trainable_params"] == d and summary["method"] == "intrinsic"
        assert summary["metrics"]["accuracy"] == next(p["value"] for p in result["points"] if p["d"] == d)
    assert (tmp_path / "id" / "intrinsic.png").stat().st_size > 0
    assert (tmp_path / "id" / "intrinsic.csv").read_text().splitlines()[0] == "d,D,accuracy,fraction_of_full,wall_time_s"
    table = format_table(result)
    assert "| full fine-tuning | 0.6000 | 100% |" in table
    # the reference read from a finished run; the finished subspace runs are reused, not retrained
    stamp = (tmp_path / "id" / "d4" / "summary.json").stat().st_mtime_ns
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "summary.json").write_text(json.dumps({"metrics": {"accuracy": 0.5, "loss": 0.7}}))
    again = analyze(data, [4], out=str(tmp_path / "id"), reference=str(tmp_path / "full"))
    assert again["reference"] == 0.5 and again["points"][0]["value"] == result["points"][0]["value"]
    assert (tmp_path / "id" / "d4" / "summary.json").stat().st_mtime_ns == stamp
    import yaml

    (tmp_path / "r.yaml").write_text(yaml.safe_dump(data))
    assert main(["analyze", "intrinsic-dim", str(tmp_path / "r.yaml"), "--dims", "4", "--out", str(tmp_path / "id"),
                 "--reference", "0.5", "--exclude", "word_embeddings"]) == 0
    assert "| full fine-tuning | 0.5000 | 100% |" in capsys.readouterr().out
    with pytest.raises(ConfigError, match="neither a number nor a finished run"):
        analyze(data, [4], out=str(tmp_path / "id"), reference=str(tmp_path / "nowhere"))



def test_a_recipe_trains_in_a_subspace_with_the_usual_trainer(recipe, tmp_path):
    from safetensors.torch import load_file

    from deltatune.train.run import train

    data = recipe(method={"type": "intrinsic", "d": 12, "exclude": ["word_embeddings"], "projection_seed": 3},
                  train={"max_steps": 3, "eval_every": None, "lr": 0.05}, output_dir=str(tmp_path / "run"))
    summary = train(data, quiet=True)
    assert summary["method"] == "intrinsic" and summary["trainable_params"] == 12
    assert summary["subspace"]["d"] == 12 and summary["subspace"]["seed"] == 3
    assert summary["total_params"] == summary["subspace"]["D"]
    saved = load_file(str(tmp_path / "run" / "subspace" / "subspace.safetensors"))
    assert saved["z"].shape == (12,) and saved["z"].abs().sum() > 0  # z starts at 0: it trained
    assert "type: intrinsic" in (tmp_path / "run" / "recipe.yaml").read_text()
    with pytest.raises(ConfigError, match="unknown option rank.*d is required"):
        train(recipe(method={"type": "intrinsic", "d": 4, "rank": 2}, output_dir=str(tmp_path / "bad")), quiet=True)
    with pytest.raises(ConfigError, match="no d"):
        train(recipe(method={"type": "intrinsic"}, output_dir=str(tmp_path / "bad2")), quiet=True)


def test_deltatune_train_in_a_fresh_process_knows_the_intrinsic_method(recipe, tmp_path):
    """train never imports experiments; the command line does, so that experiments can register
    the recipe method. An option only intrinsic refuses shows that the recipe reached it."""
    import subprocess
    import sys

    import yaml

    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe(method={"type": "intrinsic", "d": 4, "rank": 2},
                                          output_dir=str(tmp_path / "bad"))))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run([sys.executable, "-m", "deltatune", "train", str(path), "--quiet"], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 1 and "intrinsic method: unknown option rank" in done.stderr, done.stderr


@pytest.mark.parametrize("fields, named", [
    ({"d": "8k"}, "d"), ({"d": 0}, "d"), ({"d": True}, "d"), ({"d": 8, "said": "false"}, "said"),
    ({"d": 8, "projection_seed": 1.5}, "projection_seed"), ({"d": 8, "exclude": "word_embeddings"}, "exclude"),
])
def test_intrinsic_method_options_are_checked_not_converted(fields, named):
    """A string ``said: "false"`` would have switched SAID on, ``d: "8k"`` failed deep inside int()."""
    from deltatune.experiments.intrinsic import SubspaceMethod
    with pytest.raises(ConfigError, match=f"intrinsic method: {named} must be"):
        SubspaceMethod.from_section(fields)
