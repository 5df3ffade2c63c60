"""Argument parsing and printing for ``deltatune sweep`` and ``deltatune analyze ...``.

The work itself lives in the other modules of this package; this one only turns arguments into
calls and results into lines.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from deltatune.errors import ConfigError

if TYPE_CHECKING:
    from deltatune.experiments.grid import Sweep


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


# --- sweep -----------------------------------------------------------------------------------

def sweep_command(args: argparse.Namespace) -> None:
    """``deltatune sweep SWEEP.yaml [--workers N] [--out DIR] [--dry-run] [--report-only]``."""
    from deltatune.experiments.grid import load_sweep
    from deltatune.experiments.report import write_report
    from deltatune.experiments.sweep import describe, is_finished, run_sweep, threads_per_worker

    if args.workers < 0:
        raise ConfigError(f"--workers must be 0 or more, got {args.workers}")
    whole = load_sweep(args.sweep, args.out)
    part = _selected_part(whole, args)
    every = whole.runs()  # built once: the report covers them all, --seeds / --where train a part
    runs = [run for run in every if part.includes(run)]
    if args.dry_run:
        for run in runs:
            state = "finished" if is_finished(run) else "to run"
            print(f"{run.kind:8} {run.label:40} seed {run.seed}  {state:8}  {run.folder}")
        print(f"{len(runs)} runs, {sum(map(is_finished, runs))} finished")
        return
    if not args.report_only:
        todo = sum(not is_finished(r) for r in runs)
        _say(f"sweep: {len(runs)} runs ({len(runs) - todo} finished before) with {max(args.workers, 1)} "
             f"worker(s) x {threads_per_worker(max(args.workers, 1))} thread(s) -> {whole.output_dir}")
        outcomes = run_sweep(runs, args.workers, lambda o, done, total: _say(describe(o, done, total)))
        failed = [o for o in outcomes if o.status == "failed"]
        if failed:
            _say(f"sweep: {len(failed)} run(s) failed (status 'failed' in results.csv)")
    written = write_report(whole, runs=every)  # every finished run, also those outside --seeds / --where
    print(written["markdown"].read_text(), end="")
    _say("written: " + ", ".join(str(p) for p in written.values()))


def _selected_part(sweep: Sweep, args: argparse.Namespace) -> Sweep:
    """The part of ``sweep`` that ``--seeds``, ``--where`` and ``--no-baselines`` select."""
    where: dict[str, list[str]] = {}
    for item in args.where:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--where expects KEY=VALUE, got {item!r}")
        where.setdefault(key.strip(), []).append(value.strip())
    try:
        seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else None
    except ValueError:
        raise ConfigError(f"--seeds expects comma-separated integers, got {args.seeds!r}") from None
    if seeds or where:
        sweep = sweep.restrict(seeds, where)
    if args.no_baselines:
        sweep = dataclasses.replace(sweep, baselines={})
    return sweep


# --- analyze ---------------------------------------------------------------------------------

def _ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def add_analyze_arguments(p: argparse.ArgumentParser) -> None:
    """The ``analyze`` sub-subcommands and their arguments."""
    sub = p.add_subparsers(dest="analysis", metavar="ANALYSIS", required=True)

    q = sub.add_parser("intrinsic-dim", help="train in random d-dimensional subspaces (Fastfood); report d90",
                       description="Train the recipe's model in random d-dimensional subspaces of all its "
                                   "parameters (theta = theta0 + P z, P a Fastfood projection) and report d90, "
                                   "the smallest d reaching 90% of full fine-tuning's metric.")
    q.add_argument("recipe", help="recipe YAML file or built-in name (its method is ignored)")
    q.add_argument("--dims", type=_ints, required=True, help="comma-separated subspace sizes, e.g. 10,100,1000")
    q.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.SUB=VALUE",
                   help="change a recipe value for every run (repeatable)")
    q.add_argument("--out", help="output folder (default: the recipe's output_dir + '-intrinsic')")
    q.add_argument("--said", action="store_true",
                   help="structure-aware (SAID): one learned scale per parameter tensor, taken out of d")
    q.add_argument("--exclude", action="append", default=[], metavar="REGEX",
                   help="parameters (by name) kept fixed instead of projected, e.g. word_embeddings (repeatable)")
    q.add_argument("--projection-seed", type=int, default=0, help="seed of the random projection")
    q.add_argument("--reference",
                   help="the full fine-tuning metric to compare with: a number, or a finished run's folder or "
                        "summary.json (default: run full fine-tuning once)")
    q.add_argument("--full-set", dest="full_overrides", action="append", default=["train.lr=5e-5"],
                   metavar="KEY.SUB=VALUE", help="recipe changes for the full fine-tuning run (default train.lr=5e-5)")

    s = sub.add_parser("subspace", help="normalised subspace similarity of two LoRA adapters, per layer",
                       description="phi(A1, A2, i, j) = ||U_i^T V_j||_F^2 / min(i, j) from the right singular "
                                   "vectors of the two adapters' A matrices (Hu et al. 2021, section 7).")
    s.add_argument("adapter_a", help="LoRA adapter folder")
    s.add_argument("adapter_b", help="LoRA adapter folder (e.g. another rank or seed)")
    s.add_argument("--i", type=int, help="directions of A (default: its rank)")
    s.add_argument("--j", type=int, help="directions of B (default: its rank)")
    s.add_argument("--out", help="folder for the heat maps and table (default: print only)")
    s.add_argument("--json", action="store_true", help="print the results as JSON")

    a = sub.add_parser("amplification", help="how strongly a LoRA update amplifies directions of W",
                       description="||U^T W V^T||_F (U, V: top-r singular directions of dW) against ||dW||_F, "
                                   "against r random directions and against W's own top-r directions "
                                   "(Hu et al. 2021, section 7).")
    a.add_argument("adapter", help="LoRA adapter folder")
    a.add_argument("--model", help="base model alias or folder (default: the one the adapter records)")
    a.add_argument("--rank", type=int, help="directions to project on (default: the adapter's rank)")
    a.add_argument("--seed", type=int, default=0, help="seed of the random directions")
    a.add_argument("--json", action="store_true", help="print the results as JSON")

    m = sub.add_parser("params", help="trainable / total parameters, adapter file size and optimizer memory",
                       description="Build the recipe's model with its method, without training, and report "
                                   "trainable and total parameters, the adapter file size and AdamW's memory.")
    m.add_argument("recipe", help="recipe YAML file or built-in name")
    m.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.SUB=VALUE",
                   help="change a recipe value (repeatable)")
    m.add_argument("--json", action="store_true", help="print the results as JSON")


def analyze_command(args: argparse.Namespace) -> None:
    """Run the analysis ``args.analysis`` names and print its table."""
    if args.analysis == "intrinsic-dim":
        from deltatune.experiments.intrinsic import analyze, format_table

        result = analyze(args.recipe, args.dims, overrides=args.overrides, out=args.out, said=args.said,
                         exclude=args.exclude, projection_seed=args.projection_seed, reference=args.reference,
                         full_overrides=args.full_overrides, say=_say)
        print(format_table(result), end="")
    elif args.analysis == "subspace":
        from deltatune.experiments.subspace import compare_adapters, format_similarity

        result = compare_adapters(args.adapter_a, args.adapter_b, args.i, args.j,
                                  Path(args.out) if args.out else None)
        print(json.dumps(result, indent=1) if args.json else format_similarity(result), end="\n" if args.json else "")
    elif args.analysis == "amplification":
        from deltatune.experiments.subspace import adapter_amplification, format_amplification

        result = adapter_amplification(args.adapter, args.model, args.rank, args.seed)
        print(json.dumps(result, indent=1) if args.json else format_amplification(result), end="\n" if args.json else "")
    elif args.analysis == "params":
        from deltatune.experiments.params import format_params, recipe_params

        result = recipe_params(args.recipe, args.overrides)
        print(json.dumps(result) if args.json else format_params(result))
