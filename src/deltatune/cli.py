"""The ``deltatune`` command: ``train``, ``eval``, ``merge``, ``inspect``, ``demo``, ``recipes``,
``serve``, ``sweep``, ``analyze``.

Each subcommand is a function registered with :func:`command`: it declares its arguments and
runs; adding one (``serve``, ``sweep`` ...) is one more decorated function. Errors deltatune
raises on purpose print as one line, without a stack trace.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from typing import Callable

from deltatune.errors import DeltatuneError

Setup = Callable[[argparse.ArgumentParser], None]
_COMMANDS: list[tuple[str, str, Setup, Callable[[argparse.Namespace], int | None]]] = []


def command(name: str, help: str, setup: Setup = lambda p: None):
    """Register ``name``: ``setup(parser)`` adds its arguments, the decorated function runs it."""
    def register(run: Callable[[argparse.Namespace], int | None]):
        _COMMANDS.append((name, help, setup, run))
        return run
    return register


# --- train ---------------------------------------------------------------------------------

def _train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", help="recipe YAML file, or a built-in recipe name (see `deltatune recipes`)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.SUB=VALUE",
                   help="change a recipe value, e.g. --set train.lr=1e-3 (repeatable)")
    p.add_argument("--resume", action="store_true", help="continue from the output folder's last checkpoint")
    p.add_argument("--overwrite", action="store_true", help="delete a previous run in the output folder first")
    p.add_argument("--quiet", action="store_true", help="no progress output")


@command("train", "fine-tune a model from a recipe", _train_args)
def _train(args: argparse.Namespace) -> None:
    import deltatune.experiments  # noqa: F401  (registers the recipe method "intrinsic")
    from deltatune.train import train

    train(args.recipe, args.overrides, resume=args.resume, overwrite=args.overwrite, quiet=args.quiet)


# --- eval ----------------------------------------------------------------------------------

def _eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--adapter", help="adapter folder (e.g. runs/sst2-lora/adapter)")
    p.add_argument("--data", required=True, help="data file to evaluate on (.tsv .csv .jsonl .json .txt)")
    p.add_argument("--model", help="base model alias or folder (default: the one the adapter records), "
                                    "or a plain model folder to evaluate without an adapter")
    p.add_argument("--task", help="seq-cls, token-cls, causal-lm or seq2seq (default: the adapter's)")
    p.add_argument("--text", help="field holding the input text (default: the training recipe's, else 'text')")
    p.add_argument("--label", help="field holding the label (default: the training recipe's, else 'label')")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--max-length", type=int)


@command("eval", "print an adapter's metrics on a data file as one JSON line", _eval_args)
def _eval(args: argparse.Namespace) -> None:
    from deltatune.train.evaluate import evaluate

    result = evaluate(args.data, args.adapter, args.model, args.task, args.text, args.label,
                      args.batch_size, args.max_length)
    print(json.dumps(result))


# --- merge, inspect --------------------------------------------------------------------------

def _merge_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("adapter", help="adapter folder")
    p.add_argument("--out", required=True, help="folder for the merged model (save_pretrained format)")
    p.add_argument("--model", help="base model alias or folder (default: the one the adapter records)")


@command("merge", "bake an adapter into its base model and save the plain model", _merge_args)
def _merge(args: argparse.Namespace) -> None:
    from deltatune.train.merge import merge_adapter

    print(f"merged model written to {merge_adapter(args.adapter, args.out, args.model)}")


def _inspect_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("adapter", help="adapter folder")
    p.add_argument("--json", action="store_true", help="print the facts as JSON")


@command("inspect", "show an adapter's method, targets, parameter count and base model", _inspect_args)
def _inspect(args: argparse.Namespace) -> None:
    from dataclasses import asdict

    from deltatune.train.adapter_info import inspect_adapter

    info = inspect_adapter(args.adapter)
    print(json.dumps(asdict(info), default=str) if args.json else "\n".join(info.lines()))


# --- demo, recipes ---------------------------------------------------------------------------

def _demo_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="runs/demo", help="output folder (replaced on each run)")


@command("demo", "LoRA fine-tune of the embedded MiniLM on a small SST-2 sample", _demo_args)
def _demo(args: argparse.Namespace) -> None:
    from deltatune.train.demo import run_demo

    run_demo(args.out)


def _recipes_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", nargs="?", help="print this built-in recipe")


@command("recipes", "list the built-in recipes, or print one", _recipes_args)
def _recipes(args: argparse.Namespace) -> None:
    from deltatune.train.recipe import builtin_names, read_data
    import yaml

    if args.name:
        print(yaml.safe_dump(read_data(args.name), sort_keys=False), end="")
    else:
        print("\n".join(builtin_names()))


# --- serve -----------------------------------------------------------------------------------

def _serve_args(p: argparse.ArgumentParser) -> None:
    from deltatune.serve.launch import add_arguments

    add_arguments(p)


@command("serve", "serve a base model and many adapters over HTTP, batched across adapters", _serve_args)
def _serve(args: argparse.Namespace) -> None:
    from deltatune.serve.launch import serve

    serve(args)


# --- sweep, analyze --------------------------------------------------------------------------

def _sweep_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("sweep", help="sweep file (YAML: recipe, grid, seeds, baselines, output_dir)")
    p.add_argument("--workers", type=int, default=1,
                   help="runs at a time, each in its own process (0: one after another in this process)")
    p.add_argument("--out", help="output folder (default: the sweep file's output_dir)")
    p.add_argument("--seeds", help="only these seeds, comma-separated (a part of the sweep; folders stay the same)")
    p.add_argument("--where", action="append", default=[], metavar="KEY=VALUE",
                   help="only grid settings whose KEY is VALUE, as results.csv writes it (repeatable)")
    p.add_argument("--no-baselines", action="store_true", help="skip the sweep's baselines this time")
    p.add_argument("--dry-run", action="store_true", help="list the runs and exit")
    p.add_argument("--report-only", action="store_true",
                   help="rebuild results.csv, results.md and the plots from the finished runs; train nothing")


@command("sweep", "run a grid or random search over recipe keys with seeds and baselines; "
                  "results.csv, a mean ± std table and plots", _sweep_args)
def _sweep(args: argparse.Namespace) -> None:
    from deltatune.experiments.cli import sweep_command

    sweep_command(args)


def _analyze_args(p: argparse.ArgumentParser) -> None:
    from deltatune.experiments.cli import add_analyze_arguments

    add_analyze_arguments(p)


@command("analyze", "intrinsic dimension, LoRA subspace similarity and amplification, parameter and "
                    "memory tables", _analyze_args)
def _analyze(args: argparse.Namespace) -> None:
    from deltatune.experiments.cli import analyze_command

    analyze_command(args)


# --- entry point -----------------------------------------------------------------------------

def _named_command(argv: list[str] | None) -> str | None:
    """The command ``argv`` names (its first word that is one), or None."""
    names = {name for name, *_ in _COMMANDS}
    return next((a for a in (sys.argv[1:] if argv is None else argv) if a in names), None)


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The parser for ``argv``: every command listed, but only the named command's arguments set
    up (others' setups import what they need: serve's alone took seconds of every train's start)."""
    from deltatune.version import __version__

    parser = argparse.ArgumentParser(prog="deltatune", description="Parameter-efficient fine-tuning "
                                     "for Hugging Face transformers models.")
    parser.add_argument("--version", action="version", version=f"deltatune {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    chosen = _named_command(argv)
    for name, help_text, setup, run in _COMMANDS:
        p = sub.add_parser(name, help=help_text, description=help_text)
        if chosen in (None, name):
            setup(p)
        p.set_defaults(run=run)
    return parser


def _how_to_resume(args: argparse.Namespace, exc: KeyboardInterrupt) -> str:
    checkpoint = getattr(exc, "checkpoint", None)  # a TrainingInterrupted names the checkpoint it saved
    if checkpoint is None or args.command != "train":
        return ""
    sets = "".join(f" --set {shlex.quote(o)}" for o in args.overrides)
    return (f" at step {exc.step}; checkpoint saved in {checkpoint}\n"
            f"continue with: deltatune train {shlex.quote(args.recipe)}{sets} --resume")


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status (0 ok, 1 a deltatune error, 130 interrupted)."""
    args = build_parser(argv).parse_args(argv)
    try:
        return args.run(args) or 0
    except DeltatuneError as exc:
        print(f"deltatune {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as exc:
        print(f"deltatune {args.command}: interrupted{_how_to_resume(args, exc)}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
