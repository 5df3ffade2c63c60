"""kill -9 during ``model.save``: the folder always holds one whole save (issue 16).

A forked child saves the same adapter folder in a loop, each save tagging its config
(``base_model_name_or_path``) and its weights (every ``lora_B`` filled with the save's number);
the parent kills it with SIGKILL at random moments. After every kill the folder must load, and
its config and weights must carry the same number. A later successful save leaves no litter.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import signal
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import deltatune as dt
from tests.toy_models import TOYS

pytestmark = pytest.mark.usefixtures("one_thread")

KILLS = 20
BERT = TOYS["bert"]


def _tagged_save(model: dt.AdaptedModel, folder: Path, number: int) -> None:
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.fill_(float(number))
    model.configs["default"] = model.configs["default"].replace(base_model=f"save-{number}")
    model.save(folder)


def _save_forever(model: dt.AdaptedModel, folder: Path, start: int, ready) -> None:
    number = start
    _tagged_save(model, folder, number)
    ready.set()
    while True:
        number += 1
        _tagged_save(model, folder, number)


def _tags(folder: Path) -> tuple[int, set[float]]:
    config = json.loads((folder / "adapter_config.json").read_text())
    weights = load_file(str(folder / "adapter_model.safetensors"))
    values = {float(t.unique()[0]) for k, t in weights.items() if ".lora_B." in k}
    return int(config["base_model_name_or_path"].removeprefix("save-")), values


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork() to kill a saving process cheaply")
def test_a_save_killed_at_any_moment_leaves_one_whole_save(tmp_path):
    model = dt.attach(BERT.base(), dt.LoraConfig(r=8, targets=["q", "v"]))
    folder = tmp_path / "adapter"
    (tmp_path / "tokenizer.json").write_text("{}")
    context = multiprocessing.get_context("fork")
    rng = random.Random(16)
    seen = []
    for kill in range(KILLS):
        ready = context.Event()
        child = context.Process(target=_save_forever, args=(model, folder, kill * 100_000, ready), daemon=True)
        child.start()
        assert ready.wait(60), "the saving child did not start"
        time.sleep(rng.uniform(0.0, 0.05))
        os.kill(child.pid, signal.SIGKILL)
        child.join(10)
        config_tag, weight_tags = _tags(folder)
        assert weight_tags == {float(config_tag)}, f"kill {kill}: config from save {config_tag}, weights {weight_tags}"
        loaded = dt.load(BERT.base(), folder)
        assert loaded.configs["default"].base_model == f"save-{config_tag}"
        seen.append(config_tag - kill * 100_000)
    assert max(seen) > 0, "every kill landed before a second save: the test did not exercise a replace"
    _tagged_save(model, folder, 7)
    assert _tags(folder) == (7, {7.0})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "tokenizer.json"], "litter left behind"
    assert sorted(p.name for p in folder.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]


def test_a_save_keeps_other_files_in_the_folder(tmp_path):
    model = dt.attach(BERT.base(), dt.LoraConfig(r=8, targets=["q", "v"]))
    folder = tmp_path / "adapter"
    model.save(folder)
    (folder / "tokenizer.json").write_text('{"kept": true}')
    (folder / "notes").mkdir()
    (folder / "notes" / "README.md").write_text("trained on sst2")
    _tagged_save(model, folder, 3)
    assert (folder / "tokenizer.json").read_text() == '{"kept": true}'
    assert (folder / "notes" / "README.md").read_text() == "trained on sst2"
    assert _tags(folder) == (3, {3.0})


def test_without_an_atomic_exchange_the_swap_renames_aside_and_cleans_up(tmp_path, monkeypatch):
    from deltatune.core import publish

    monkeypatch.setattr(publish, "_RENAMEAT2", None)  # as on macOS or an old kernel
    model = dt.attach(BERT.base(), dt.LoraConfig(r=8, targets=["q", "v"]))
    folder = tmp_path / "adapter"
    _tagged_save(model, folder, 1)
    (tmp_path / ".adapter.x1y2.publish").mkdir()  # what a killed save would have left
    _tagged_save(model, folder, 2)
    assert _tags(folder) == (2, {2.0})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]
