"""``deltatune sweep``: grid expansion and validation, runs in worker processes, resuming,
failures recorded, results.csv / results.md / plots."""

from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path

import pytest

from deltatune.cli import main
from deltatune.errors import ConfigError
from deltatune.experiments import report, results, sweep as sweep_mod
from deltatune.experiments.grid import Sweep, load_sweep, setting_label
from deltatune.train import recipe as rc

FAST = {"train.max_steps": 3, "train.eval_every": None, "train.threads": 1}


def make_sweep(recipe, tmp_path, **changes) -> dict:
    data = {"recipe": recipe(), "grid": {"method.r": [1, 2]}, "seeds": [0, 1], "baselines": [],
            "set": dict(FAST), "output_dir": str(tmp_path / "sweep")}
    data.update(changes)
    return data


def read_rows(path: Path) -> list[dict]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


# --- the sweep file --------------------------------------------------------------------------

def test_grid_expands_settings_seeds_and_default_baselines(recipe, tmp_path):
    data = make_sweep(recipe, tmp_path, grid={"method.r": [1, 2, 4], "method.targets": [["q"], ["q", "v"]]},
                      seeds=[0, 1])
    del data["baselines"]  # default: full and head-only
    runs = load_sweep(data).runs()
    grid = [r for r in runs if r.kind == "grid"]
    base = [r for r in runs if r.kind == "baseline"]
    assert len(grid) == 3 * 2 * 2 and len(base) == 2 * 2
    assert {(r.recipe["method"]["r"], tuple(r.recipe["method"]["targets"]), r.recipe["train"]["seed"]) for r in grid} == {
        (r, t, s) for r in (1, 2, 4) for t in (("q",), ("q", "v")) for s in (0, 1)}
    assert len({r.folder for r in runs}) == len(runs)  # every run has its own folder
    full = [r for r in base if r.label == "full"]
    assert [r.recipe["method"] for r in full] == [{"type": "full"}] * 2
    assert full[0].recipe["train"]["lr"] == 5.0e-5 and full[0].recipe["train"]["weight_decay"] == 0.01
    head = next(r for r in base if r.label == "head-only")
    assert head.recipe["train"]["lr"] == 2.0e-3
    # the sweep's fixed settings reach every run, grid values keep their types
    assert all(r.recipe["train"]["max_steps"] == 3 for r in runs)
    assert grid[0].recipe["output_dir"] == str(grid[0].folder)
    assert setting_label({"method.r": 8, "method.targets": ["q", "v"]}) == "r=8 targets=q,v"


def test_bundle_axes_change_several_keys_together(recipe, tmp_path, sentiment_files):
    setups = [{"name": "lora", "method": {"type": "lora", "r": 2, "targets": ["q"]}, "train.lr": 1.0e-3},
              {"name": "ia3", "method": {"type": "ia3", "targets": ["k", "v"], "feedforward": []}, "train.lr": 5.0e-3}]
    datasets = [{"name": "a", "data.train": sentiment_files["train"], "data.eval": sentiment_files["eval"]},
                {"name": "b", "data.train": sentiment_files["eval"], "data.eval": sentiment_files["train"]}]
    sweep = load_sweep(make_sweep(recipe, tmp_path, grid={"dataset": datasets, "setup": setups}, seeds=[0]))
    runs = sweep.runs()
    assert [r.label for r in runs] == ["dataset=a setup=lora", "dataset=a setup=ia3", "dataset=b setup=lora",
                                       "dataset=b setup=ia3"]
    ia3_b = runs[3]
    assert ia3_b.recipe["method"]["type"] == "ia3" and ia3_b.recipe["train"]["lr"] == 5.0e-3
    assert ia3_b.recipe["data"]["train"] == sentiment_files["eval"] and ia3_b.recipe["data"]["text"] == "sentence"
    assert results.run_row(ia3_b, sweep.keys)["setup"] == "ia3"
    bad = [{"name": "x", "train.lrr": 1}]
    with pytest.raises(ConfigError, match="'train.lrr'"):
        load_sweep(make_sweep(recipe, tmp_path, grid={"setup": bad}))
    with pytest.raises(ConfigError, match="its own name"):
        load_sweep(make_sweep(recipe, tmp_path, grid={"setup": [{"name": "x"}, {"name": "x"}]}))


def test_baselines_per_data_set_and_restricting_a_sweep(recipe, tmp_path, sentiment_files):
    datasets = [{"name": "a", "data.train": sentiment_files["train"]}, {"name": "b", "data.train": sentiment_files["eval"]}]
    data = make_sweep(recipe, tmp_path, grid={"dataset": datasets, "method.r": [1, 2]}, seeds=[0, 1],
                      baselines=["full"], baselines_over=["dataset"])
    sweep = load_sweep(data)
    base = [r for r in sweep.runs() if r.kind == "baseline"]
    assert [(r.label, r.seed) for r in base] == [("full dataset=a", 0), ("full dataset=a", 1), ("full dataset=b", 0),
                                                  ("full dataset=b", 1)]
    assert base[2].recipe["data"]["train"] == sentiment_files["eval"] and base[2].recipe["method"] == {"type": "full"}
    part = sweep.restrict([1], {"dataset": ["b"]})
    assert [(r.label, r.seed) for r in part.runs()] == [("dataset=b r=1", 1), ("dataset=b r=2", 1), ("full dataset=b", 1)]
    # the same folders as in the whole sweep, so the part's results count towards it
    assert {r.folder for r in part.runs()} < {r.folder for r in sweep.runs()}
    # the part picks its runs out of the whole sweep's without building them again
    assert [r for r in sweep.runs() if part.includes(r)] == part.runs()
    grid_only = dataclasses.replace(part, baselines={})
    assert [r for r in sweep.runs() if grid_only.includes(r)] == part.runs()[:2]
    with pytest.raises(ConfigError, match="no value is c; values: a, b"):
        sweep.restrict(None, {"dataset": ["c"]})
    with pytest.raises(ConfigError, match="not a grid key"):
        sweep.restrict(None, {"seed": ["1"]})
    # a seed outside the sweep would train runs that its report leaves out
    with pytest.raises(ConfigError, match="^--seeds 2: not a seed of the sweep; seeds: 0, 1$"):
        sweep.restrict([1, 2])
    with pytest.raises(ConfigError, match="baselines_over names data"):
        load_sweep({**data, "baselines_over": ["data"]})


def test_baselines_can_be_turned_off_or_configured(recipe, tmp_path):
    assert all(r.kind == "grid" for r in load_sweep(make_sweep(recipe, tmp_path, baselines=[])).runs())
    runs = load_sweep(make_sweep(recipe, tmp_path, baselines={"full": {"train.lr": 1.0e-4}}, seeds=[3])).runs()
    (full,) = [r for r in runs if r.kind == "baseline"]
    assert full.recipe["train"]["lr"] == 1.0e-4 and full.recipe["train"]["seed"] == 3


def test_random_search_draws_distinct_settings_from_the_grid(recipe, tmp_path):
    grid = {"method.r": [1, 2, 4, 8], "train.lr": [1e-3, 1e-2]}
    data = make_sweep(recipe, tmp_path, grid=grid, seeds=[0], search="random", trials=3, search_seed=7)
    settings = load_sweep(data).settings()
    assert len(settings) == 3 and len({json.dumps(s) for s in settings}) == 3
    assert all(s["method.r"] in grid["method.r"] and s["train.lr"] in grid["train.lr"] for s in settings)
    assert settings == load_sweep(data).settings()  # reproducible from search_seed
    assert len(load_sweep({**data, "trials": 100}).settings()) == 8  # never more than the grid holds
    # a part of a random search is a part of the same draw
    part = load_sweep(data).restrict(None, {"train.lr": ["0.01"]}).settings()
    assert part and part == [s for s in settings if s["train.lr"] == 1e-2]


@pytest.mark.parametrize("grid, words", [
    ({"train.lrr": [1]}, ["'train.lrr' in the sweep's grid", "unknown key lrr in train", "valid keys: epochs,", "lr,"]),
    ({"trian.lr": [1]}, ["'trian.lr'", "unknown recipe key trian", "valid keys: model, task, data, method, train"]),
    ({"data.maxlen": [1]}, ["'data.maxlen'", "unknown key maxlen in data", "max_length"]),
    ({"train.lr.x": [1]}, ["'train.lr.x'", "train.lr is a value, not a section"]),
    ({"model.name": [1]}, ["'model.name'", "model is a value, not a section"]),
    ({"method.rank": [1]}, ["rank", "valid options", "r,", "alpha"]),
])
def test_unknown_grid_keys_are_named_with_the_valid_ones(recipe, tmp_path, grid, words):
    with pytest.raises(ConfigError) as err:
        load_sweep(make_sweep(recipe, tmp_path, grid=grid)).runs()
    for word in words:
        assert word in str(err.value)


@pytest.mark.parametrize("key, data", [
    ("train.lrr", {"train": {"lrr": 1}}),
    ("trian.lr", {"trian": {"lr": 1}}),
    ("data.maxlen", {"data": {"train": "x.tsv", "maxlen": 1}}),
])
def test_an_unknown_sweep_key_gets_the_recipes_own_message(recipe, tmp_path, key, data):
    with pytest.raises(ConfigError) as in_recipe:
        rc.from_dict({"data": {"train": "x.tsv"}, **data})
    with pytest.raises(ConfigError) as in_grid:
        load_sweep(make_sweep(recipe, tmp_path, grid={key: [1]}))
    assert str(in_grid.value) == f"'{key}' in the sweep's grid: {in_recipe.value}"
    with pytest.raises(ConfigError) as in_set:
        load_sweep(make_sweep(recipe, tmp_path, set={key: 1}))
    assert str(in_set.value) == f"'{key}' in the sweep's set: {in_recipe.value}"


def test_a_whole_data_or_train_section_is_a_grid_key(recipe, tmp_path, sentiment_files):
    """As for ``method``, a grid value may be a whole section (``train`` and ``data`` used to be
    refused as unknown keys); its keys are checked when the runs are built."""
    sections = [{"lr": 1.0e-3, "max_steps": 3}, {"lr": 2.0e-3, "max_steps": 5}]
    runs = load_sweep(make_sweep(recipe, tmp_path, grid={"train": sections}, seeds=[0])).runs()
    assert [(r.recipe["train"]["lr"], r.recipe["train"]["max_steps"]) for r in runs] == [(1.0e-3, 3), (2.0e-3, 5)]
    data = [{"train": sentiment_files["eval"], "text": "sentence"}]
    (run,) = load_sweep(make_sweep(recipe, tmp_path, grid={"data": data}, seeds=[0])).runs()
    assert run.recipe["data"]["train"] == sentiment_files["eval"] and run.recipe["data"]["eval"] is None
    with pytest.raises(ConfigError, match="unknown key lrr in train"):
        load_sweep(make_sweep(recipe, tmp_path, grid={"train": [{"lrr": 1}]})).runs()


def test_bad_sweep_files_fail_clearly(recipe, tmp_path):
    with pytest.raises(ConfigError, match="unknown sweep key gird; valid keys: recipe, grid"):
        load_sweep({**make_sweep(recipe, tmp_path), "gird": {}})
    with pytest.raises(ConfigError, match="non-empty list"):
        load_sweep(make_sweep(recipe, tmp_path, grid={"method.r": 4}))
    with pytest.raises(ConfigError, match="seeds"):
        load_sweep(make_sweep(recipe, tmp_path, seeds=[]))
    with pytest.raises(ConfigError, match="trials"):
        load_sweep(make_sweep(recipe, tmp_path, search="random"))
    with pytest.raises(ConfigError, match="names no recipe"):
        load_sweep({"grid": {}, "output_dir": "x"})


def test_recipe_is_found_by_file_relative_to_the_sweep_or_builtin_name(recipe, tmp_path):
    import yaml

    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "r.yaml").write_text(yaml.safe_dump(recipe()))
    sweep_file = tmp_path / "sub" / "s.yaml"
    sweep_file.write_text(yaml.safe_dump({"recipe": "r.yaml", "grid": {"method.r": [2]}, "baselines": [],
                                          "output_dir": str(tmp_path / "o")}))
    (run,) = load_sweep(sweep_file).runs()
    assert run.recipe["method"]["r"] == 2 and run.recipe["model"] == recipe()["model"]
    assert load_sweep({"recipe": "sst2-lora", "output_dir": "x", "baselines": []}).recipe["method"]["type"] == "lora"


def test_threads_per_worker_never_oversubscribes():
    assert sweep_mod.threads_per_worker(1, cores=2) == 2
    assert sweep_mod.threads_per_worker(2, cores=2) == 1
    assert sweep_mod.threads_per_worker(3, cores=8) == 2
    assert sweep_mod.threads_per_worker(4, cores=2) == 1


# --- tables ----------------------------------------------------------------------------------

def test_aggregate_and_markdown_are_mean_and_sample_std_over_seeds():
    rows = [{"kind": "grid", "label": "r=1", "method": "lora", "status": "ok", "trainable_params": "100",
             "wall_time_s": "10", "eval_accuracy": "0.8"},
            {"kind": "grid", "label": "r=1", "method": "lora", "status": "ok", "trainable_params": "100",
             "wall_time_s": "20", "eval_accuracy": "0.9"},
            {"kind": "grid", "label": "r=1", "method": "lora", "status": "failed"},
            {"kind": "baseline", "label": "full", "method": "full", "status": "ok", "trainable_params": "5000",
             "wall_time_s": "30", "eval_accuracy": "0.95"}]
    (lora, full) = results.aggregate(rows)
    assert lora["n"] == 2 and lora["failed"] == 1
    assert lora["eval_accuracy"][0] == pytest.approx(0.85)
    assert lora["eval_accuracy"][1] == pytest.approx((2 * 0.05 ** 2 / 1) ** 0.5)  # sample std, n - 1 = 1
    assert full["eval_accuracy"] == (pytest.approx(0.95), None)
    table = results.markdown([lora, full]).splitlines()
    assert table[0] == "| setting | method | seeds | accuracy | trainable params | wall time (s) |"
    assert table[2] == "| r=1 | lora | 2 (1 failed) | 0.8500 ± 0.0707 | 100 | 15 ± 7 |"
    assert table[3] == "| baseline: full | full | 1 | 0.9500 | 5,000 | 30 |"


# --- running ---------------------------------------------------------------------------------

def test_sweep_runs_records_failures_and_resumes(recipe, tmp_path):
    """Two ranks and a setting that cannot attach (no module matches its target): the bad run is
    recorded as failed, the others finish; a second call trains nothing; the files follow."""
    data = make_sweep(recipe, tmp_path, grid={"method.targets": [["q", "v"], ["no_such_module"]], "method.r": [1, 2]},
                      seeds=[0], baselines=["head-only"])
    sweep = load_sweep(data)
    outcomes = sweep_mod.run_sweep(sweep.runs(), workers=0)
    status = {(o.run.label, o.run.seed): o.status for o in outcomes}
    assert status == {("targets=q,v r=1", 0): "done", ("targets=q,v r=2", 0): "done",
                      ("targets=no_such_module r=1", 0): "failed", ("targets=no_such_module r=2", 0): "failed",
                      ("head-only", 0): "done"}
    failed = next(o for o in outcomes if o.status == "failed")
    assert "no_such_module" in failed.error and (failed.run.folder / "error.txt").is_file()

    written = report.write_report(sweep)
    rows = read_rows(written["csv"])
    assert len(rows) == 5
    assert list(rows[0])[:4] == ["method.targets", "method.r", "seed", "kind"]
    for column in ("method", "status", "trainable_params", "eval_accuracy", "wall_time_s", "peak_memory_mb"):
        assert column in rows[0]
    ok = {r["method.r"]: r for r in rows if r["status"] == "ok" and r["kind"] == "grid"}
    # LoRA on q and v of the toy BERT (hidden 32, 2 blocks): r * (32 + 32) per module, 4 modules
    assert int(ok["2"]["trainable_params"]) - int(ok["1"]["trainable_params"]) == 4 * (32 + 32)
    head = next(r for r in rows if r["kind"] == "baseline")
    # head-only trains the classifier (32 x 2 + 2); LoRA r=1 trains that too, plus 4 x 64
    assert int(head["trainable_params"]) == 32 * 2 + 2
    assert int(ok["1"]["trainable_params"]) == 4 * 64 + 66
    summary = json.loads((Path(ok["1"]["folder"]) / "summary.json").read_text())
    assert float(ok["1"]["eval_accuracy"]) == summary["metrics"]["accuracy"]
    assert "| targets=q,v r=1 | lora | 1 |" in written["markdown"].read_text()
    assert "| targets=no_such_module r=1 | lora | 0 (1 failed) |" in written["markdown"].read_text()
    assert written["metric_vs_params"].stat().st_size > 0 and written["metric_vs_rank"].stat().st_size > 0

    stamp = (Path(ok["1"]["folder"]) / "summary.json").stat().st_mtime_ns
    again = sweep_mod.run_sweep(sweep.runs(), workers=0)
    assert [o.status for o in again if o.run.label.startswith("targets=q")] == ["cached", "cached"]
    assert (Path(ok["1"]["folder"]) / "summary.json").stat().st_mtime_ns == stamp


@pytest.mark.slow  # two subprocesses that each import torch and transformers: 15-30 s
def test_sweep_command_with_worker_processes(recipe, tmp_path, capsys):
    """``deltatune sweep --workers 2``: each run in its own ``python -m deltatune train`` process
    with one torch thread; a run whose process fails is recorded and the others finish."""
    import yaml

    data = make_sweep(recipe, tmp_path, grid={"method.targets": [["q"], ["no_such_module"]]},
                      seeds=[0], baselines=[])
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(data))
    assert main(["sweep", str(path), "--dry-run"]) == 0
    assert "2 runs, 0 finished" in capsys.readouterr().out
    assert main(["sweep", str(path), "--workers", "2"]) == 0
    captured = capsys.readouterr()
    assert "| targets=q | lora | 1 |" in captured.out
    assert "| targets=no_such_module | lora | 0 (1 failed) |" in captured.out
    assert "FAILED" in captured.err
    rows = read_rows(tmp_path / "sweep" / "results.csv")
    assert [(r["method.targets"], r["status"]) for r in rows] == [("q", "ok"), ("no_such_module", "failed")]
    run_yaml = yaml.safe_load((Path(rows[0]["folder"]) / "run.yaml").read_text())
    assert run_yaml["train"]["threads"] == 1
    assert "exit status 1" in rows[1]["error"] and "no_such_module" in rows[1]["error"]


def test_sweep_command_dry_run_with_a_part_of_the_sweep(recipe, tmp_path, capsys):
    import yaml

    data = make_sweep(recipe, tmp_path, grid={"method.r": [1, 2]}, seeds=[0, 1], baselines=["full"])
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(data))
    assert main(["sweep", str(path), "--dry-run"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "6 runs, 0 finished"
    assert main(["sweep", str(path), "--dry-run", "--seeds", "1", "--where", "method.r=2", "--no-baselines"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and lines[0].split()[:4] == ["grid", "r=2", "seed", "1"] and lines[1] == "1 runs, 0 finished"
    assert main(["sweep", str(path), "--dry-run", "--seeds", "0,one"]) == 1
    assert "--seeds expects comma-separated integers, got '0,one'" in capsys.readouterr().err
    assert main(["sweep", str(path), "--dry-run", "--seeds", "0,5"]) == 1
    assert "--seeds 5: not a seed of the sweep; seeds: 0, 1" in capsys.readouterr().err
    assert main(["sweep", str(path), "--dry-run", "--where", "method.r=3"]) == 1
    assert "no value is 3; values: 1, 2" in capsys.readouterr().err
    assert main(["sweep", str(path), "--where", "r"]) == 1
    assert "--where expects KEY=VALUE" in capsys.readouterr().err


def test_sweep_command_builds_the_runs_once(recipe, tmp_path, capsys, monkeypatch):
    """Training a part of the sweep and reporting on all of it takes one expansion of the sweep
    (each one builds and validates every run's recipe)."""
    import yaml

    data = make_sweep(recipe, tmp_path, grid={"method.r": [1, 2]}, seeds=[0, 1], baselines=[])
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(data))
    expand, built = Sweep.runs, []
    monkeypatch.setattr(Sweep, "runs", lambda self: built.append(self) or expand(self))
    assert main(["sweep", str(path), "--workers", "0", "--seeds", "1", "--where", "method.r=2"]) == 0
    assert len(built) == 1
    assert "| r=2 | lora | 1 |" in capsys.readouterr().out
    rows = read_rows(tmp_path / "sweep" / "results.csv")
    assert [(r["method.r"], r["seed"], r["status"]) for r in rows] == [("2", "1", "ok")]
    assert main(["sweep", str(path), "--report-only"]) == 0 and len(built) == 2
