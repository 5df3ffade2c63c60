"""The small things a first training run meets: Ctrl-C saves and says how to resume, the console
shows the loss metrics.jsonl records, a resume with changed settings says so, max_eval applies
to a carved-out eval split, the plot legend stays off the curves, help and error texts."""

from __future__ import annotations

import io
import os
import signal
from pathlib import Path

import pytest
import yaml

from deltatune import cli
from deltatune.errors import ConfigError
from deltatune.train import callbacks, train
from deltatune.train.callbacks import read_records
from deltatune.train.evaluate import evaluate
from deltatune.train.interrupt import TrainingInterrupted
from deltatune.train.loop import Trainer


def _ctrl_c_at(monkeypatch, step: int) -> None:
    """Press Ctrl-C (a real SIGINT to this process) during optimizer step ``step``."""
    original = Trainer._train_step

    def train_step(self, group):
        if self.state["step"] + 1 == step:
            os.kill(os.getpid(), signal.SIGINT)
        return original(self, group)
    monkeypatch.setattr(Trainer, "_train_step", train_step)


def test_ctrl_c_saves_a_checkpoint_and_prints_the_resume_command(recipe, tmp_path, monkeypatch, capsys):
    r = recipe(train={"checkpoint_every": 100, "eval_every": 100, "max_steps": 5})
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(r))
    _ctrl_c_at(monkeypatch, 3)
    assert cli.main(["train", str(path), "--set", "train.log_every=1", "--quiet"]) == 130
    err = capsys.readouterr().err
    saved = Path(r["output_dir"]) / "checkpoints" / "step-0000003"
    assert (saved / "state.json").is_file()  # the step that was running finished first
    assert f"interrupted at step 3; checkpoint saved in {saved}" in err
    command = err.strip().splitlines()[-1]
    assert command == f"continue with: deltatune train {path} --set train.log_every=1 --resume"
    monkeypatch.undo()
    assert cli.main(command.removeprefix("continue with: deltatune ").split() + ["--quiet"]) == 0
    assert yaml.safe_load((Path(r["output_dir"]) / "summary.json").read_text())["resumed"] is True


def test_training_interrupted_is_a_keyboard_interrupt(recipe, monkeypatch):
    _ctrl_c_at(monkeypatch, 2)
    before = signal.getsignal(signal.SIGINT)  # Python's default, or SIG_IGN in a background job
    with pytest.raises(KeyboardInterrupt) as caught:
        train(recipe(), quiet=True)
    assert isinstance(caught.value, TrainingInterrupted) and caught.value.step == 2
    assert signal.getsignal(signal.SIGINT) is before  # the handler is put back


def test_console_loss_is_the_logged_window_mean(recipe):
    r = recipe(train={"log_every": 3, "eval_every": 100})
    stream = io.StringIO()  # not a terminal: plain lines every log_every steps
    train(r, stream=stream)
    printed = {int(line.split()[1].split("/")[0]): float(line.split("loss ")[1].split()[0])
               for line in stream.getvalue().splitlines() if line.startswith("step ")}
    logged = {rec["step"]: rec["loss"] for rec in read_records(Path(r["output_dir"]) / "metrics.jsonl")
              if rec["kind"] == "train"}
    assert printed and set(printed) == set(logged)
    for step, loss in printed.items():
        assert loss == pytest.approx(logged[step], abs=5e-5)


def test_resume_with_fewer_steps_warns_naming_the_change(recipe, monkeypatch):
    r = recipe(train={"checkpoint_every": 2, "eval_every": 100})
    _ctrl_c_at(monkeypatch, 3)
    with pytest.raises(TrainingInterrupted):
        train(r, quiet=True)
    monkeypatch.undo()
    with pytest.warns(UserWarning, match=r"train\.max_steps None -> 8.*learning-rate schedule"):
        summary = train(r, ["train.max_steps=8"], resume=True, quiet=True)
    assert summary["steps"] == 8


def test_max_eval_limits_a_carved_out_eval_split(recipe):
    r = recipe(data={"eval": None, "eval_fraction": 0.25, "max_eval": 10})
    assert train(r, quiet=True)["eval_examples"] == 10


def test_loss_plot_legend_stays_off_the_axes(tmp_path, monkeypatch):
    figures = []
    monkeypatch.setattr(callbacks, "save_figure", lambda fig, target, dpi=None: figures.append(fig))
    records = [{"kind": "train", "step": s, "loss": 1 / s} for s in range(1, 20)]
    records += [{"kind": "eval", "step": s, "loss": 1 / s, "accuracy": 1 - 1 / s} for s in (1, 10, 19)]
    assert callbacks.plot_losses(records, tmp_path / "loss.png")
    fig = figures[0]
    fig.tight_layout()
    fig.canvas.draw()
    axes, legend = fig.axes[0], fig.axes[0].get_legend()
    try:
        assert len(legend.get_texts()) == 3
        assert not legend.get_window_extent().overlaps(axes.get_window_extent())
    finally:
        callbacks.pyplot().close(fig)  # save_figure, which closes it, was replaced above


def test_intrinsic_dim_help_shows_a_plain_percent(capsys):
    with pytest.raises(SystemExit):
        cli.main(["analyze", "intrinsic-dim", "--help"])
    out = capsys.readouterr().out
    assert "90%" in out and "90%%" not in out


def test_eval_of_a_missing_file_names_the_argument(recipe, tmp_path):
    with pytest.raises(ConfigError, match="--data argument") as caught:
        evaluate(tmp_path / "missing.tsv", model="minilm")
    assert "fix the path in the recipe" not in str(caught.value)


def test_cli_sets_up_only_the_named_commands_arguments(capsys):
    import subprocess
    import sys

    # a fresh interpreter: what `deltatune train ...` imports before it trains
    code = ("import sys; from deltatune import cli; cli.build_parser(['train', 'r.yaml']).parse_args(['train', 'r.yaml']);"
            "print(sorted(m for m in ('deltatune.serve.launch', 'transformers.trainer_utils') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
    # every command is still listed, and a named command gets its own arguments
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    listed = capsys.readouterr().out
    assert all(name in listed for name, *_ in cli._COMMANDS)
    argv = ["serve", "--model", "minilm", "--port", "8123"]
    args = cli.build_parser(argv).parse_args(argv)
    assert (args.model, args.port) == ("minilm", 8123)
