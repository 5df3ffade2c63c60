"""Which modules a config touches: names, suffixes, regexes, "all-linear", component aliases
(q k v o up down gate), the alias groups "attention" and "mlp", and layer selection ("lower",
"upper", "even", "odd", or a list)."""

from __future__ import annotations

import contextlib
import contextvars
import re
from collections import Counter
from typing import Iterable, Sequence

from torch import nn

from deltatune.core.archspec import COMPONENTS, GROUPS, ArchSpec, head_names, spec_for
from deltatune.core.config import LAYER_WORDS
from deltatune.core.layer import AdapterLayer, linear_kinds
from deltatune.core.patterns import compile_pattern, fullmatch
from deltatune.core.wrapping import containers_wrapped
from deltatune.errors import TargetError

LayerSelection = None | str | Sequence[int]


_WALKS: contextvars.ContextVar[dict | None] = contextvars.ContextVar("deltatune_visible_walks", default=None)


@contextlib.contextmanager
def walk_once():
    """Within the block :func:`visible_modules` walks each model once and then reuses the walk.

    For adding an adapter, which resolves targets, heads and saved names in several walks: it
    only puts wrappers in place, and a wrapper stands for the module it wraps, so what the walk
    sees does not change, unless the wrapped module has sub-modules (a head kept as a trainable
    copy): those become hidden, and the next call walks again. Not for code that adds or removes
    other modules meanwhile.
    """
    token = _WALKS.set({})
    try:
        yield
    finally:
        _WALKS.reset(token)


def visible_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Named modules as the user's model has them: an adapter wrapper stands for the layer it
    wraps, and the adapter's own sub-modules are not candidates."""
    walks = _WALKS.get()
    saved = walks.get(id(model)) if walks is not None else None
    if saved is not None and saved[0] is model and saved[2] == containers_wrapped():
        return dict(saved[1])
    out: dict[str, nn.Module] = {}

    def walk(module: nn.Module, prefix: str) -> None:
        for name, child in module._modules.items():
            if child is None:
                continue
            path = f"{prefix}{name}"
            if isinstance(child, AdapterLayer):
                out[path] = child.base_layer
            else:
                out[path] = child
                walk(child, path + ".")

    walk(model, "")
    if walks is not None:
        walks[id(model)] = (model, dict(out), containers_wrapped())
    return out


def _matches_name(path: str, target: str) -> bool:
    return path == target or path.endswith("." + target)


def _block_sizes(model_paths: Iterable[str], spec) -> dict[str, int]:
    sizes: dict[str, int] = {}
    for path in model_paths:
        split = spec.split(path)
        if split:
            stack, index, _ = split
            sizes[stack] = max(sizes.get(stack, 0), index + 1)
    return sizes


def _layer_filter(layers: LayerSelection, modules: dict[str, nn.Module], spec):
    if layers is None or layers == "all":
        return None
    sizes = _block_sizes(modules, spec)  # only when a selection needs it: a walk over every path
    if isinstance(layers, str):
        if layers not in LAYER_WORDS:
            raise TargetError(f"unknown layer selection {layers!r}; use a list of indices or one of {LAYER_WORDS}")
        rule = {
            "lower": lambda i, n: i < n // 2, "upper": lambda i, n: i >= n // 2,
            "even": lambda i, n: i % 2 == 0, "odd": lambda i, n: i % 2 == 1,
        }[layers]
        return lambda stack, i: rule(i, sizes[stack])
    chosen = set(int(i) for i in layers)
    biggest = max(sizes.values(), default=0)
    bad = sorted(i for i in chosen if i < 0 or i >= biggest)
    if bad:
        raise TargetError(f"layers {bad} do not exist: the model's blocks are numbered 0..{biggest - 1}")
    return lambda stack, i: i in chosen


def _kind_ok(module: nn.Module, kinds: tuple[type, ...]) -> bool:
    return isinstance(module, kinds)


def alias_map(model: nn.Module, modules: dict[str, nn.Module] | None = None) -> dict[str, list[str]]:
    """``alias -> [module paths]`` for every component alias that selects something in ``model``,
    paths in model order (e.g. ``{"q": ["model.layers.0.self_attn.q_proj", ...], ...}``)."""
    modules = visible_modules(model) if modules is None else modules
    spec = spec_for(model)
    found: dict[str, list[str]] = {c: [] for c in COMPONENTS}
    for path in _alias_candidates(modules):
        split = spec.split(path)
        for component in spec.components_of(split[2]) if split else ():
            found[component].append(path)
    return {c: paths for c, paths in found.items() if paths}


def _alias_candidates(modules: dict[str, nn.Module]) -> list[str]:
    # an alias names a projection, a leaf layer: MPT's "ffn" container is not DistilBERT's "ffn" Linear
    return [p for p, m in modules.items() if next(m.children(), None) is None]


def _alias_hits(spec: ArchSpec, modules: dict[str, nn.Module], component: str) -> set[str]:
    return {p for p in _alias_candidates(modules)
            if (s := spec.split(p)) and component in spec.components_of(s[2])}


def _candidates_message(modules: dict[str, nn.Module], kinds: tuple[type, ...], spec) -> str:
    leaves = Counter(p.rsplit(".", 1)[-1] for p, m in modules.items() if _kind_ok(m, kinds))
    listed = ", ".join(f"{n} (x{c})" if c > 1 else n for n, c in sorted(leaves.items()))
    resolved = {c: sorted({p.rsplit(".", 1)[-1] for p in _alias_hits(spec, modules, c)}) for c in COMPONENTS}
    aliases = "; ".join(f"{c} -> {', '.join(names)}" for c, names in resolved.items() if names)
    message = f"modules it can wrap: {listed or 'none'}; component aliases on this model: {aliases or 'none'}"
    experts = _fused_expert_parameters(modules, spec)
    if experts:
        message += (f"; its routed experts are fused 3-D parameters ({', '.join(experts)}), not layers: "
                    f"only LoRA adapts those (docs/models.md)")
    return message


def _fused_expert_parameters(modules: dict[str, nn.Module], spec: ArchSpec) -> list[str]:
    """Block-relative names of 3-D weights (fused MoE experts) that an alias would mean."""
    return sorted({spec.split(path)[2] for path in _fused_parameter_paths(modules, spec)})


def _fused_parameter_paths(modules: dict[str, nn.Module], spec: ArchSpec) -> dict[str, frozenset[str]]:
    """``"path.param" -> aliases`` for every 3-D weight inside a block that an alias names."""
    found: dict[str, frozenset[str]] = {}
    for path, module in modules.items():
        for name, param in module._parameters.items():
            if param is None or param.dim() != 3:  # the cheap test first: this runs on every add
                continue
            split = spec.split(f"{path}.{name}")
            components = spec.components_of(split[2]) if split else frozenset()
            if components:
                found[f"{path}.{name}"] = components
    return found


def resolve_parameters(model: nn.Module, targets: str | Sequence[str] | None, names: Sequence[str] | None,
                       layers: LayerSelection = None) -> list[str]:
    """Paths (``module.param``) of the fused 3-D expert weights that the component aliases in
    ``targets`` select, plus those ``names`` selects (peft's ``target_parameters``: a path that
    equals a name or ends with ``.name``), in model order."""
    modules = visible_modules(model)
    spec = spec_for(model)
    fused = _fused_parameter_paths(modules, spec)
    aliases = set(GROUPS.get(targets, ())) if isinstance(targets, str) else set(targets or ())
    chosen = {p for p, components in fused.items() if components & aliases}
    if not chosen and not names:
        return []
    for name in names or ():
        hits = {p for p in _all_parameter_paths(modules) if _matches_name(p, name)}
        if not hits:
            raise TargetError(f"target_parameters entry {name!r} matches no parameter of {type(model).__name__}"
                              + (f"; its fused expert weights: {', '.join(_fused_expert_parameters(modules, spec))}"
                                 if fused else ""))
        chosen |= hits
    keep = _layer_filter(layers, modules, spec)
    if keep is not None:
        chosen = {p for p in chosen if (s := spec.split(p)) and keep(s[0], s[1])}
    return [p for p in _all_parameter_paths(modules) if p in chosen]


def _all_parameter_paths(modules: dict[str, nn.Module]) -> list[str]:
    return [f"{path}.{name}" for path, module in modules.items() for name, _ in module.named_parameters(recurse=False)]


def resolve_targets(
    model: nn.Module,
    targets: str | Sequence[str] | None,
    *,
    kinds: tuple[type, ...],
    layers: LayerSelection = None,
    exclude: str | Sequence[str] | None = None,
    default: Sequence[str] = ("q", "v"),
    parameters: bool = False,
) -> list[str]:
    """Paths of the modules ``targets`` selects, in model order.

    ``targets`` is a list of names (a module matches when its path equals the name or ends with
    ``.name``) and component aliases, a regex string (whole-path match), ``"all-linear"``
    (every linear layer but the output head and the classification head), or an alias group:
    ``"attention"`` (q k v o) or ``"mlp"`` (up down gate).
    Raises :class:`TargetError` when an entry matches nothing, naming the modules that exist.
    With ``parameters`` (a method that also adapts fused expert weights, see
    :func:`resolve_parameters`), aliases that name only such weights select no module but are
    no error.
    """
    modules = visible_modules(model)
    spec = spec_for(model)
    if targets is None:
        targets = tuple(default)
    if isinstance(targets, str) and targets == "all-linear":
        skip = head_names(model)
        chosen = {p for p, m in modules.items()
                  if isinstance(m, linear_kinds()) and not any(_matches_name(p, s) for s in skip)}
    elif isinstance(targets, str) and targets in GROUPS:
        chosen = _select_names(model, modules, list(GROUPS[targets]), kinds, spec, parameters)
    elif isinstance(targets, str):
        compile_pattern("targets", targets)
        chosen = {p for p in modules if fullmatch("targets", targets, p)}
        if not chosen:
            raise TargetError(f"targets regex {targets!r} matches no module; {_candidates_message(modules, kinds, spec)}")
    else:
        chosen = _select_names(model, modules, list(targets), kinds, spec, parameters)
    if exclude:
        if isinstance(exclude, str):
            chosen = {p for p in chosen if not fullmatch("exclude", exclude, p)}
        else:
            chosen = {p for p in chosen if not any(_matches_name(p, e) for e in exclude)}
    keep = _layer_filter(layers, modules, spec)
    if keep is not None:
        chosen = {p for p in chosen if (s := spec.split(p)) and keep(s[0], s[1])}
        if not chosen and not parameters:
            raise TargetError(f"no targeted module lies in layers {layers!r}")
    wrong = sorted(p for p in chosen if not _kind_ok(modules[p], kinds))
    if wrong:
        kinds_txt = ", ".join(k.__name__ for k in kinds)
        raise TargetError(
            f"{wrong[0]} is a {type(modules[wrong[0]]).__name__}, which this method cannot wrap "
            f"(it wraps {kinds_txt}); name the layers inside it instead. {_candidates_message(modules, kinds, spec)}")
    return [p for p in modules if p in chosen]


def _select_names(model: nn.Module, modules: dict[str, nn.Module], targets: list[str],
                  kinds: tuple[type, ...], spec: ArchSpec, parameters: bool = False) -> set[str]:
    """Paths a list of names and component aliases selects.

    A name must match something. A component alias the model lacks (``gate`` on BERT) is passed
    over, so one list fits many families, as long as the aliases of the list select something.
    """
    chosen: set[str] = set()
    by_alias: set[str] = set()
    # a family may add group words of its own (diffusers' "self-attention", "resnets")
    aliases = [t for t in targets if t in COMPONENTS or t in spec.components]
    for target in targets:
        if target in aliases:
            by_alias |= _alias_hits(spec, modules, target)
            continue
        hits = {p for p in modules if _matches_name(p, target)}
        if not hits:
            raise TargetError(f"target {target!r} matches no module in {type(model).__name__}; "
                              f"{_candidates_message(modules, kinds, spec)}")
        chosen |= hits
    if aliases and not by_alias and not (
            parameters and any(c & set(aliases) for c in _fused_parameter_paths(modules, spec).values())):
        raise TargetError(f"targets {aliases} match no module in {type(model).__name__}; "
                          f"{_candidates_message(modules, kinds, spec)}")
    return chosen | by_alias


def compact_targets(model: nn.Module, paths: Sequence[str]) -> list[str]:
    """The shortest name-suffix list that selects exactly ``paths`` (PEFT's list semantics).

    Used when saving, so a file says ``["query", "value"]`` rather than every full path, yet
    still names exactly the wrapped modules for any reader.
    """
    wanted = set(paths)
    all_paths = list(visible_modules(model))
    depth = max((p.count(".") + 1 for p in wanted), default=1)
    for k in range(1, depth + 1):
        # a suffix never starts at a bare block number: "layer.2.output.dense", not "2.output.dense"
        if any(len(p.split(".")) > k and p.split(".")[-k].isdigit() for p in wanted):
            continue
        suffixes = sorted({".".join(p.split(".")[-k:]) for p in wanted})
        if {p for p in all_paths if any(_matches_name(p, s) for s in suffixes)} == wanted:
            return suffixes
    return sorted(wanted)
