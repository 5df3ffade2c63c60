"""Sweep files: parse, validate, and expand into the list of runs.

```yaml
recipe: path/to/recipe.yaml          # or a built-in recipe name, or an inline recipe mapping
grid: {method.r: [1, 8], method.targets: [[q], [q, v]]}   # dotted recipe keys
seeds: [0, 1, 2]
baselines: [full, head-only]         # default; [] turns them off
output_dir: runs/sweep-rank
search: grid                         # or random (then ``trials: N`` settings drawn from the grid)
```

A grid key is a dotted recipe key (``train.lr``, ``data.max_length``, ``method.r``) or a whole
section (``method: [{type: lora, r: 8}, {type: ia3}]``). Settings that must change together
form a *bundle axis*: a grid key that is not a recipe key, whose values are mappings with a
``name`` and dotted recipe keys::

    grid:
      dataset:
        - {name: sst2, data.train: ../shared/data/sst2/train.tsv, data.eval: ../shared/data/sst2/dev.tsv}
        - {name: mr, data.train: ../shared/data/mr/train.tsv, data.eval: ../shared/data/mr/test.tsv}
      setup:
        - {name: lora, method: {type: lora, r: 8, targets: [q, v]}, train.lr: 1.0e-3}
        - {name: ia3, method: {type: ia3}, train.lr: 5.0e-3}

Every run's recipe is built and its method resolved before anything trains, so a typo fails
the sweep at once with the valid keys.

Baselines are run once per seed with the recipe's ``method`` replaced: ``full`` (every parameter
trains, ``train.lr`` 5e-5, weight decay 0.01) and ``head-only`` (``train.lr`` 2e-3), the settings
of the built-in ``sst2-full`` / ``sst2-head-only`` recipes. A mapping gives other settings:
``baselines: {full: {train.lr: 1.0e-4}, head-only: {}}``. ``baselines_over: [dataset]`` runs the
baselines once per value of those grid keys too (e.g. per data set).
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import yaml

from deltatune.core.config import is_int
from deltatune.errors import ConfigError, DeltatuneError
from deltatune.train import recipe as recipe_mod
from deltatune.train.methods import resolve as resolve_method

#: keys a sweep file may hold
SWEEP_KEYS = ("recipe", "grid", "seeds", "baselines", "output_dir", "search", "trials", "search_seed", "set",
              "baselines_over")
#: overrides of each built-in baseline (the built-in sst2-full / sst2-head-only settings)
DEFAULT_BASELINES: dict[str, dict[str, Any]] = {
    "full": {"train.lr": 5.0e-5, "train.weight_decay": 0.01},
    "head-only": {"train.lr": 2.0e-3},
}


@dataclass
class Run:
    """One training run of a sweep.

    Attributes:
        setting: the grid values of this run, ``{dotted key: value}`` (empty for baselines).
        seed: ``train.seed``.
        label: a short human-readable name of the setting (``r=8 targets=q,v`` or ``full``).
        folder: the run's output folder (``<output_dir>/runs/<setting id>/seed<seed>``).
        recipe: the complete recipe data of the run (paths absolute, output_dir set).
        baseline: the baseline's name (``None`` for grid runs).
    """

    setting: dict[str, Any]
    seed: int
    label: str
    folder: Path
    recipe: dict = field(repr=False)
    baseline: str | None = None

    @property
    def kind(self) -> str:
        """``"grid"`` or ``"baseline"``."""
        return "grid" if self.baseline is None else "baseline"

    @property
    def method(self) -> str:
        return str(self.recipe["method"]["type"])


@dataclass
class Sweep:
    """A parsed sweep file. ``runs()`` expands it."""

    recipe: dict
    grid: dict[str, list]
    seeds: list[int]
    baselines: dict[str, dict[str, Any]]
    output_dir: Path
    search: str = "grid"
    trials: int | None = None
    search_seed: int = 0
    overrides: dict[str, Any] = field(default_factory=dict)
    bundles: tuple[str, ...] = ()
    baselines_over: tuple[str, ...] = ()
    #: only settings whose grid values (as results.csv writes them) are among these
    where: dict[str, list[str]] = field(default_factory=dict)

    @property
    def keys(self) -> list[str]:
        """The grid keys, in file order."""
        return list(self.grid)

    def settings(self) -> list[dict[str, Any]]:
        """The grid settings: the full product, or ``trials`` of them drawn without replacement."""
        keys = self.keys
        combos = [dict(zip(keys, values)) for values in itertools.product(*(self.grid[k] for k in keys))]
        if self.search == "random":
            rng = random.Random(self.search_seed)
            combos = rng.sample(combos, min(self.trials or len(combos), len(combos)))
        return [c for c in combos if self._selected(c)]

    def _selected(self, setting: dict[str, Any]) -> bool:
        return all(format_value(setting[k]) in wanted for k, wanted in self.where.items() if k in setting)

    def runs(self) -> list[Run]:
        """Every run (grid settings x seeds, then baselines x seeds), each validated."""
        out = []
        for setting in self.settings():
            label = setting_label(setting)
            for seed in self.seeds:
                out.append(self._run(setting, seed, label, setting_id(setting),
                                     {**self.overrides, **self.expand(setting)}))
        over = self.baselines_over
        contexts = [dict(zip(over, values)) for values in itertools.product(*(self.grid[k] for k in over))]
        contexts = [c for c in contexts if self._selected(c)]
        for name, changes in self.baselines.items():
            for context in contexts:
                label = " ".join([name] + ([setting_label(context)] if context else []))
                ident = f"baseline-{_slug(name)}" + (f"-{setting_id(context)}" if context else "")
                for seed in self.seeds:
                    values = {**self.overrides, **self.expand(context), "method": {"type": name}, **changes}
                    out.append(self._run(context, seed, label, ident, values, baseline=name))
        return out

    def includes(self, run: Run) -> bool:
        """Whether ``run``, one of the runs of this sweep or of the sweep it was restricted from,
        is one of this sweep's: its seed, grid values and baseline are among this sweep's."""
        return (run.seed in self.seeds and self._selected(run.setting)
                and (run.baseline is None or run.baseline in self.baselines))

    def restrict(self, seeds: list[int] | None = None, where: dict[str, list[str]] | None = None) -> "Sweep":
        """The part of this sweep with only ``seeds`` and the grid values of ``where``
        (``{grid key: [value as results.csv writes it, ...]}``). Run folders stay the same, so a
        reduced run's results count towards the whole sweep later (and a random search draws the
        same settings before the selection)."""
        outside = [str(s) for s in seeds or [] if s not in self.seeds]
        if outside:
            raise ConfigError(f"--seeds {','.join(outside)}: not a seed of the sweep; seeds: "
                              f"{', '.join(map(str, self.seeds))}")
        grid = self.grid
        for key, wanted in (where or {}).items():
            if key not in grid:
                raise ConfigError(f"--where {key}: not a grid key; grid keys: {', '.join(grid) or 'none'}")
            if not any(format_value(v) in wanted for v in grid[key]):
                raise ConfigError(f"--where {key}: no value is {' or '.join(wanted)}; values: "
                                  f"{', '.join(format_value(v) for v in grid[key])}")
        return dataclasses.replace(self, where={**self.where, **(where or {})},
                                   seeds=list(seeds) if seeds else self.seeds)

    def expand(self, setting: dict[str, Any]) -> dict[str, Any]:
        """A setting as ``{dotted recipe key: value}``: bundle values spread into their keys."""
        out: dict[str, Any] = {}
        for key, value in setting.items():
            if key in self.bundles:
                out.update({k: v for k, v in value.items() if k != "name"})
            else:
                out[key] = value
        return out

    def _run(self, setting: dict, seed: int, label: str, ident: str, values: dict,
             baseline: str | None = None) -> Run:
        folder = self.output_dir / "runs" / ident / f"seed{seed}"
        values = {**values, "train.seed": seed, "output_dir": str(folder)}
        where = f"setting {label!r}" if baseline is None else f"baseline {label!r}"
        try:
            built = recipe_mod.from_dict(recipe_mod.set_keys(self.recipe, values.items()), Path.cwd())
            resolve_method(built.method)
        except DeltatuneError as exc:
            raise ConfigError(f"sweep {where}: {exc}") from None
        return Run(setting, seed, label, folder, built.to_dict(), baseline)


# --- parsing ---------------------------------------------------------------------------------

def load_sweep(source: str | Path | dict, output_dir: str | Path | None = None) -> Sweep:
    """A validated :class:`Sweep` from a YAML file or a mapping.

    ``recipe:`` may be a file (relative to the current folder, else to the sweep file's), a
    built-in recipe name, or an inline mapping. Raises :class:`ConfigError` naming the bad key.
    """
    if isinstance(source, dict):
        data, here = dict(source), Path.cwd()
    else:
        path = Path(source)
        if not path.is_file():
            raise ConfigError(f"sweep file {str(source)!r} not found")
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path} is not valid YAML: {exc}") from None
        here = path.resolve().parent
    if not isinstance(data, dict):
        raise ConfigError("a sweep file is a mapping with recipe:, grid:, seeds:, baselines:, output_dir:")
    unknown = sorted(set(data) - set(SWEEP_KEYS))
    if unknown:
        raise ConfigError(f"unknown sweep key{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}; "
                          f"valid keys: {', '.join(SWEEP_KEYS)}")
    if "recipe" not in data:
        raise ConfigError("the sweep names no recipe: set recipe: to a recipe file, built-in name or mapping")
    recipe = _recipe_data(data["recipe"], here)
    grid = data.get("grid") or {}
    if not isinstance(grid, dict):
        raise ConfigError("grid must map dotted recipe keys to lists of values, e.g. {method.r: [1, 8]}")
    grid = {str(k): _values(k, v) for k, v in grid.items()}
    bundles = tuple(key for key, values in grid.items() if _is_bundle_axis(key, values))
    for key, values in grid.items():
        if key in bundles:
            for value in values:
                _check_keys([k for k in value if k != "name"], f"the sweep's grid ({key}: {value['name']})")
        else:
            _check_keys([key], "the sweep's grid")
    overrides = data.get("set") or {}
    if not isinstance(overrides, dict):
        raise ConfigError("set must map dotted recipe keys to values, e.g. {train.max_steps: 200}")
    _check_keys(overrides, "the sweep's set")
    seeds = data.get("seeds", [0])
    seeds = [seeds] if isinstance(seeds, int) else seeds
    if not isinstance(seeds, list) or not seeds or not all(is_int(s) for s in seeds):
        raise ConfigError(f"seeds must be a non-empty list of integers, got {seeds!r}")
    search = data.get("search", "grid")
    if search not in ("grid", "random"):
        raise ConfigError(f"search must be grid or random, got {search!r}")
    trials = data.get("trials")
    if search == "random" and (not isinstance(trials, int) or trials < 1):
        raise ConfigError("search: random needs trials: N (how many settings to draw from the grid)")
    over = data.get("baselines_over") or []
    over = [over] if isinstance(over, str) else over
    missing = [k for k in over if k not in grid]
    if missing:
        raise ConfigError(f"baselines_over names {', '.join(map(str, missing))}, which the grid does not have; "
                          f"grid keys: {', '.join(grid) or 'none'}")
    out = output_dir or data.get("output_dir")
    if not out:
        raise ConfigError("the sweep names no output_dir (set output_dir: or pass --out)")
    return Sweep(recipe=recipe, grid=grid, seeds=list(seeds), baselines=_baselines(data.get("baselines", ["full", "head-only"])),
                 output_dir=Path(out), search=search, trials=trials, search_seed=int(data.get("search_seed", 0)),
                 overrides={str(k): v for k, v in overrides.items()}, bundles=bundles,
                 baselines_over=tuple(over))


def _recipe_data(value: Any, here: Path) -> dict:
    if isinstance(value, dict):
        return value
    if not isinstance(value, str):
        raise ConfigError(f"recipe must be a file, a built-in recipe name or a mapping, got {value!r}")
    if not Path(value).is_file() and (here / value).is_file():
        value = str(here / value)
    return recipe_mod.read_data(value)


def _values(key: Any, values: Any) -> list:
    if not isinstance(values, list) or not values:
        raise ConfigError(f"grid key {key!r} needs a non-empty list of values, got {values!r}")
    return values


def _is_bundle_axis(key: str, values: list) -> bool:
    """A grid key that is not a recipe section, with ``{name: ..., dotted.key: value}`` values."""
    if key.split(".")[0] in recipe_mod.KEYS:
        return False
    if not all(isinstance(v, dict) and "name" in v for v in values):
        return False
    names = [str(v["name"]) for v in values]
    if len(set(names)) != len(names):
        raise ConfigError(f"grid key {key!r}: every value needs its own name, got {', '.join(names)}")
    return True


def _baselines(value: Any) -> dict[str, dict[str, Any]]:
    if value is None:
        return {}
    if isinstance(value, str):
        value = [value]
    if isinstance(value, list):
        value = {name: None for name in value}
    if not isinstance(value, dict):
        raise ConfigError(f"baselines must be a list of method names or a mapping, got {value!r}")
    out = {}
    for name, changes in value.items():
        if changes is None:
            changes = DEFAULT_BASELINES.get(str(name), {})
        if not isinstance(changes, dict):
            raise ConfigError(f"baseline {name!r}: settings must be a mapping of dotted keys, got {changes!r}")
        out[str(name)] = dict(changes)
    return out


def _check_keys(keys: Iterable[Any], where: str) -> None:
    """Check dotted recipe keys of the sweep by the recipe's own rules (method options are
    checked when each run is built, as the method type can itself be a grid key)."""
    for key in keys:
        try:
            recipe_mod.check_key(str(key))
        except ConfigError as exc:
            raise ConfigError(f"{str(key)!r} in {where}: {exc}") from None


# --- names -----------------------------------------------------------------------------------

def format_value(value: Any) -> str:
    """A compact text form of a grid value: ``[q, v]`` -> ``q,v``; mappings as ``k=v`` pairs."""
    if isinstance(value, (list, tuple)):
        return ",".join(format_value(v) for v in value)
    if isinstance(value, dict):
        if "name" in value:
            return str(value["name"])
        return " ".join(f"{k}={format_value(v)}" for k, v in value.items())
    return str(value)


def setting_label(setting: dict[str, Any]) -> str:
    """``method.r=8, method.targets=[q, v]`` -> ``r=8 targets=q,v`` (the last key part names it)."""
    short = [k.split(".")[-1] for k in setting]
    names = short if len(set(short)) == len(short) else list(setting)
    return " ".join(f"{n}={format_value(v)}" if n != "method" else format_value(v)
                    for n, v in zip(names, setting.values())) or "recipe"


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.,=+-]+", "_", text).strip("_")[:60] or "x"


def setting_id(setting: dict[str, Any]) -> str:
    """A folder name for a setting: a readable slug plus a short hash of the exact values."""
    digest = hashlib.sha256(json.dumps(setting, sort_keys=True, default=str).encode()).hexdigest()[:6]
    return f"{_slug(setting_label(setting))}-{digest}"
