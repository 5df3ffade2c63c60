"""Intrinsic dimension: train a model in a random d-dimensional subspace of its parameters.

Li et al. (2018), Aghajanyan et al. (2020): freeze the pretrained parameters theta0 (all D of
them) and train only ``z`` (d values) in

    theta = theta0 + P z            (DID, "direct intrinsic dimension")
    theta_i = theta0_i + lambda_i (P z)_i   (SAID: one learned scale per parameter tensor i;
                                              the m scales count towards d)

with ``P`` a :class:`~deltatune.experiments.fastfood.Fastfood` projection over the concatenation
of all projected tensors (one global map; memory O(D), never a D x d matrix). ``z`` starts at
0, so training starts from the pretrained model. ``d90`` is the smallest d whose metric reaches
90% of full fine-tuning's.

The model is called through :func:`torch.func.functional_call` with ``theta`` as its
parameters: nothing in the user's model is replaced or patched.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import re
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from safetensors.torch import save_file
from torch import nn

from deltatune.core.config import is_int, positive_int, require
from deltatune.errors import ConfigError
from deltatune.experiments.fastfood import Fastfood
from deltatune.train.distributed import launched
from deltatune.train.files import replace_dir
from deltatune.train.methods import TrainMethod, register_training_method


class SubspaceModel(nn.Module):
    """``model`` reparameterised as ``theta0 + P z`` (or SAID); only ``z`` (and the SAID scales)
    train. Calls pass straight through to the model with the projected parameters.

    Args:
        model: the base model; its parameters are frozen and kept as theta0.
        d: the subspace dimension (trainable values in all).
        said: structure-aware: one scale per projected tensor, taken out of ``d``.
        exclude: regexes of parameter names kept at theta0 instead of projected.
        seed: seed of the random projection.
    """

    def __init__(self, model: nn.Module, d: int, *, said: bool = False, exclude: Iterable[str] = (),
                 seed: int = 0) -> None:
        super().__init__()
        if d < 1:
            raise ConfigError(f"the subspace dimension d must be at least 1, got {d}")
        self.model = model
        for p in model.parameters():
            p.requires_grad_(False)
        patterns = [re.compile(x) for x in exclude]
        named = [(n, p) for n, p in model.named_parameters() if not any(x.search(n) for x in patterns)]
        if not named:
            raise ConfigError("every parameter is excluded: nothing is left to project")
        self.names = [n for n, _ in named]
        self.shapes = [p.shape for _, p in named]
        self.sizes = [p.numel() for _, p in named]
        self.said = said
        self.d = d
        self.D = sum(self.sizes)
        scales = len(named) if said else 0
        if d <= scales:
            raise ConfigError(f"SAID spends one of the d values on each of the {scales} projected tensors; "
                              f"d={d} leaves none for the projection (use d > {scales}, or DID)")
        device = named[0][1].device
        self.projection = Fastfood(d - scales, self.D, seed=seed, device=device)
        self.z = nn.Parameter(torch.zeros(d - scales, device=device))
        self.scales = nn.Parameter(torch.ones(scales, device=device)) if said else None
        self.seed = seed
        self.exclude = list(exclude)
        self._cache: tuple[tuple, dict] | None = None

    @property
    def config(self):
        """The base model's config (what code that looks at ``model.config`` expects)."""
        return self.model.config

    def deltas(self) -> dict[str, torch.Tensor]:
        """``{name: theta_i - theta0_i}`` for every projected tensor."""
        flat = self.projection(self.z)
        out = {}
        for i, (name, shape, piece) in enumerate(zip(self.names, self.shapes, flat.split(self.sizes))):
            if self.scales is not None:
                piece = piece * self.scales[i]
            out[name] = piece.view(shape)
        return out

    def parameters_now(self) -> dict[str, torch.Tensor]:
        """The projected parameters ``theta`` (cached while gradients are off and z is unchanged)."""
        key = (self.z._version, None if self.scales is None else self.scales._version, self.z.data_ptr())
        if not torch.is_grad_enabled() and self._cache is not None and self._cache[0] == key:
            return self._cache[1]
        base = dict(self.model.named_parameters())
        theta = {name: base[name] + delta.to(base[name].dtype) for name, delta in self.deltas().items()}
        self._cache = (key, theta) if not torch.is_grad_enabled() else None
        return theta

    def forward(self, *args, **kwargs):
        return torch.func.functional_call(self.model, self.parameters_now(), args, kwargs)

    def trainable(self) -> int:
        """How many values train: d."""
        return self.z.numel() + (0 if self.scales is None else self.scales.numel())

    def parameter_counts(self) -> tuple[int, int]:
        """``(trainable, total)`` as a run reports them: d of the D projected parameters."""
        return self.trainable(), self.D

    def describe(self) -> dict:
        return {"d": self.d, "D": self.D, "mode": "said" if self.said else "did", "projection": "fastfood",
                "block": self.projection.n, "seed": self.seed, "exclude": self.exclude, "tensors": len(self.names)}


class SubspaceMethod(TrainMethod):
    """The recipe method ``{type: intrinsic, d: 1000, said: false, exclude: [], projection_seed: 0}``:
    wraps the model in :class:`SubspaceModel`; saves ``z`` (and the SAID scales) with the
    projection's facts. Any recipe trains this way with ``deltatune train`` too."""

    name, result = "intrinsic", "subspace"
    options = ("d", "said", "exclude", "projection_seed")

    def __init__(self, d: int, said: bool = False, exclude: Iterable[str] = (), projection_seed: int = 0) -> None:
        # checked, not converted: int("8k") or bool("false") would train something else than asked
        positive_int("intrinsic method: d", d)
        require(isinstance(said, bool), "intrinsic method: said", said, "true or false")
        require(is_int(projection_seed), "intrinsic method: projection_seed", projection_seed, "an integer")
        require(isinstance(exclude, (list, tuple)) and all(isinstance(x, str) for x in exclude),
                "intrinsic method: exclude", exclude, "a list of regular expressions")
        self.d, self.said, self.exclude, self.projection_seed = d, said, list(exclude), projection_seed

    @classmethod
    def from_section(cls, fields: dict) -> "SubspaceMethod":
        """From a recipe's ``method`` section (without its ``type``), naming any unknown option."""
        unknown = sorted(set(fields) - set(cls.options))
        if unknown or "d" not in fields:
            problem = f"unknown option{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}" if unknown else "no d"
            raise ConfigError(f"intrinsic method: {problem}; options: {', '.join(cls.options)} (d is required)")
        return cls(**fields)

    def apply(self, model: nn.Module) -> SubspaceModel:
        if launched():
            raise ConfigError("subspace training runs in one process; start it without torchrun")
        return SubspaceModel(model, self.d, said=self.said, exclude=self.exclude, seed=self.projection_seed)

    def save(self, model: SubspaceModel, folder: Path) -> None:
        tensors = {"z": model.z.detach().cpu().contiguous()}
        if model.scales is not None:
            tensors["scales"] = model.scales.detach().cpu().contiguous()

        def fill(tmp: Path) -> None:
            save_file(tensors, str(tmp / "subspace.safetensors"))
            (tmp / "subspace.json").write_text(json.dumps(model.describe(), indent=1) + "\n")
        replace_dir(folder, fill)

    def describe(self) -> dict:
        return {"type": self.name, "d": self.d, "said": self.said, "exclude": self.exclude,
                "projection_seed": self.projection_seed}

    def summary_facts(self, model: SubspaceModel) -> dict:
        return {"subspace": model.describe()}


register_training_method("intrinsic", SubspaceMethod.from_section)


def train_subspace(recipe, d: int, *, said: bool = False, exclude: Iterable[str] = (), projection_seed: int = 0,
                   quiet: bool = True) -> dict:
    """Train ``recipe`` (a :class:`~deltatune.train.recipe.Recipe`; its method is replaced) in a
    random ``d``-dimensional subspace with the usual trainer, and return its summary. A folder
    that already holds a ``summary.json`` is a finished run: its summary is returned without
    training; an unfinished one resumes from its last checkpoint."""
    from deltatune.train.run import train

    out = Path(recipe.output_dir)
    if (out / "summary.json").is_file():
        return json.loads((out / "summary.json").read_text())
    method = SubspaceMethod(d, said, exclude, projection_seed).describe()
    return train(dataclasses.replace(recipe, method=method), resume=True, quiet=quiet)


def d90(points: list[dict], reference: float, fraction: float = 0.9) -> int | None:
    """The smallest ``d`` among ``points`` (``{"d", "value"}``) whose value reaches
    ``fraction * reference`` (None when none does)."""
    reached = [p["d"] for p in points if p["value"] >= fraction * reference]
    return min(reached) if reached else None


def reference_value(reference: float | str | Path, metric: str) -> float:
    """A reference metric given as a number, or read from a finished run (its folder or its
    ``summary.json``)."""
    try:
        return float(reference)
    except (TypeError, ValueError):
        pass
    path = Path(reference)
    path = path / "summary.json" if path.is_dir() else path
    if not path.is_file():
        raise ConfigError(f"--reference {reference!r} is neither a number nor a finished run (no {path})")
    metrics = json.loads(path.read_text()).get("metrics") or {}
    if metric not in metrics:
        raise ConfigError(f"{path} has no {metric!r} metric (it has {', '.join(metrics) or 'none'})")
    return float(metrics[metric])


def analyze(recipe_source, dims: list[int], *, overrides: list[str] | tuple[str, ...] = (), out: str | None = None,
            said: bool = False, exclude: Iterable[str] = (), projection_seed: int = 0,
            reference: float | str | Path | None = None,
            full_overrides: list[str] | tuple[str, ...] = ("train.lr=5e-5",),
            say: Callable[[str], None] = lambda line: None) -> dict:
    """``deltatune analyze intrinsic-dim``: full fine-tuning once (unless ``reference`` is given),
    then one subspace run per d (``reference`` may be a number or a finished run's folder); writes ``intrinsic.csv``, ``intrinsic.json`` and
    ``intrinsic.png`` into ``out`` and returns ``{"metric", "reference", "points", "d90", ...}``.
    Finished runs (their ``summary.json`` exists) are reused."""
    from deltatune.experiments.plots import intrinsic_plot
    from deltatune.train import tasks
    from deltatune.train.recipe import load, read_data
    from deltatune.train.run import train

    data = recipe_source if isinstance(recipe_source, dict) else read_data(recipe_source)
    base = load(data, list(overrides))
    root = Path(out or f"{base.output_dir}-intrinsic")
    metric = base.train.best_metric or tasks.get(base.task).default_metric
    if metric in ("loss", "perplexity"):
        raise ConfigError(f"d90 compares a metric where higher is better; {base.task}'s {metric} is not one: "
                          f"set train.best_metric")
    root.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"metric": metric, "mode": "said" if said else "did", "exclude": list(exclude),
                              "projection_seed": projection_seed, "root": str(root)}
    if reference is None:
        say(f"intrinsic-dim: full fine-tuning reference -> {root / 'full'}")
        full = train(data, [*overrides, "method={type: full}", *full_overrides, f"output_dir={root / 'full'}"],
                     resume=True, quiet=True)
        reference = float(full["metrics"][metric])
        result["full_trainable_params"] = full["trainable_params"]
    else:
        result["reference_source"] = str(reference)
        reference = reference_value(reference, metric)
    result["reference"] = reference
    points = []
    for d in sorted(set(dims)):
        recipe = load(data, [*overrides, f"output_dir={root / f'd{d}'}"])
        say(f"intrinsic-dim: d = {d} -> {recipe.output_dir}")
        summary = train_subspace(recipe, d, said=said, exclude=exclude, projection_seed=projection_seed)
        points.append({"d": d, "value": float(summary["metrics"][metric]), "D": summary["total_params"],
                       "wall_time_s": summary["wall_time_s"]})
        say(f"intrinsic-dim: d = {d}: {metric} {points[-1]['value']:.4f} (full: {reference:.4f})")
    result["points"] = points
    result["d90"] = d90(points, reference)
    with (root / "intrinsic.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["d", "D", metric, "fraction_of_full", "wall_time_s"])
        writer.writeheader()
        for p in points:
            writer.writerow({"d": p["d"], "D": p["D"], metric: p["value"],
                             "fraction_of_full": round(p["value"] / reference, 4) if reference else "",
                             "wall_time_s": p["wall_time_s"]})
    result.update(intrinsic_plot(points, reference, metric, result["d90"], root / "intrinsic.png"))
    result = json.loads(json.dumps(result, default=str))
    (root / "intrinsic.json").write_text(json.dumps(result, indent=1) + "\n")
    return result


def format_table(result: dict) -> str:
    """The intrinsic-dimension result as a Markdown table plus the d90 line."""
    metric, ref = result["metric"], result["reference"]
    lines = [f"| d | {metric} | of full |", "|---|---|---|"]
    for p in result["points"]:
        lines.append(f"| {p['d']:,} | {p['value']:.4f} | {p['value'] / ref:.1%} |" if ref else f"| {p['d']} | {p['value']:.4f} | - |")
    lines.append(f"| full fine-tuning | {ref:.4f} | 100% |")
    d = result["d90"]
    lines.append("")
    lines.append(f"d90 = {d:,}" if d is not None else f"d90: no d tried reached 90% of {ref:.4f}")
    return "\n".join(lines) + "\n"
