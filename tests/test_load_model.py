"""``dt.load_model``: the natural auto class per embedded model, and one short line (not
transformers' loading report) about the weights it had to initialise."""

from __future__ import annotations

import pytest
import transformers

import deltatune as dt
from deltatune.core import loading


def test_default_auto_class_per_embedded_model():
    assert dt.default_auto_class("smollm2") == "AutoModelForCausalLM"
    assert dt.default_auto_class("minilm") == "AutoModelForSequenceClassification"
    assert dt.default_auto_class("/some/folder") == "AutoModelForSequenceClassification"


def test_a_new_head_is_mentioned_once_in_one_line(capfd, monkeypatch):
    monkeypatch.setattr(loading, "_told_about_new_heads", set())
    reference, info = transformers.AutoModelForSequenceClassification.from_pretrained(
        dt.resolve_model("minilm").path, num_labels=2, output_loading_info=True)
    capfd.readouterr()
    model = dt.load_model("minilm", num_labels=2)
    assert type(model) is type(reference)
    lines = [line for line in capfd.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and "newly initialised: classifier " in lines[0]
    assert sorted(info["missing_keys"]) == ["classifier.bias", "classifier.weight"]  # what the line summarises
    dt.load_model("minilm", num_labels=2)
    dt.load_model("minilm", num_labels=2, quiet=True)
    assert capfd.readouterr().err.strip() == ""


def test_verbose_shows_transformers_report_and_only_then(caplog, capfd):
    before = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # even a caller who silenced transformers gets it when asking
    try:
        dt.load_model("minilm", num_labels=2, quiet=True)
        shown = caplog.text + capfd.readouterr().err
        assert "LOAD REPORT" not in shown
        dt.load_model("minilm", num_labels=2, verbose=True)
        shown = caplog.text + capfd.readouterr().err
        assert "LOAD REPORT" in shown and "MISSING" in shown
    finally:
        transformers.logging.set_verbosity(before)


@pytest.mark.parametrize("quiet", [True, False])
def test_a_complete_checkpoint_says_nothing(capfd, monkeypatch, quiet):
    monkeypatch.setattr(loading, "_told_about_new_heads", set())
    dt.load_model("minilm", "AutoModel", quiet=quiet)
    assert capfd.readouterr().err.strip() == ""
