"""AdaptedModel: a base model plus named adapters that can be switched, disabled, merged, removed."""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Sequence

import torch
from torch import nn

from deltatune.core import merging, registry
from deltatune.core.archspec import classification_head_names, task_type_of
from deltatune.core.attention_dropout import CpuDropout
from deltatune.core.config import MethodConfig
from deltatune.core.hf_interop import HuggingFaceFacade, with_base_signature
from deltatune.core.layer import AdapterLayer, ModelAdapter, ModulesToSave, read_through
from deltatune.core.quantized import handler_for
from deltatune.core.report import format_report
from deltatune.core.routing import BASE_ADAPTER, call_model_mixed, check_mixable
from deltatune.core.shared_params import SharedParameterValues
from deltatune.core.targets import compact_targets, visible_modules
from deltatune.core.wrapping import submodule, wrapped
from deltatune.errors import AdapterError, ConfigError, TargetError

#: operations a package above the core implements for every AdaptedModel (compose: combine,
#: hot_swap); the core calls them without importing that package
_PROVIDED: dict[str, Callable] = {}


def provide(operation: str, function: Callable) -> None:
    """Let ``AdaptedModel.<operation>(...)`` call ``function(model, ...)``."""
    _PROVIDED[operation] = function


def _provided(operation: str) -> Callable:
    try:
        return _PROVIDED[operation]
    except KeyError:
        raise AdapterError(f"{operation} is implemented in deltatune.compose; import deltatune.compose "
                           f"(import deltatune does)") from None


class AdaptedModel(HuggingFaceFacade, nn.Module):
    """A frozen base model with one or more adapters.

    Calls (``model(**batch)``, ``model.generate(...)``) go to the base model, whose targeted
    layers now carry the adapters. Attribute look-ups the wrapper does not know fall through to
    the base model (``model.config`` works).
    """

    #: in training mode on a CPU, draw dropout masks with deltatune's fast generator
    #: (:mod:`deltatune.core.attention_dropout`; the same distribution, another random stream).
    #: False keeps torch's masks.
    cpu_dropout: bool = True

    def __init__(self, base_model: nn.Module) -> None:
        super().__init__()
        self.base_model = base_model
        self._dropout_sites: CpuDropout | None = None  # found on the first training call
        self.configs: dict[str, MethodConfig] = {}
        self.active_adapters: list[str] = []
        self._shared = SharedParameterValues(base_model)
        self._trainable: set[str] = set()
        #: adapters whose layer parameters the last trainable refresh froze (see _refresh_trainable)
        self._frozen_adapters: set[str] = set()
        self._layer_index: dict[str, AdapterLayer] = {}
        self._module_rank: dict[str, int] = {}
        self._reindex()
        #: per-adapter modules that act on the whole call (prompt encoders), by adapter name
        self.model_adapters = nn.ModuleDict()
        self._adapters_disabled = False
        for p in base_model.parameters():
            p.requires_grad_(False)

    # --- calls ----------------------------------------------------------------------------
    @with_base_signature
    def forward(self, *args, adapter_names: Sequence[str] | None = None, **kwargs):
        """The base model's forward with the active adapters; ``adapter_names`` (one name per
        row, ``"__base__"`` for none) runs each row through its own adapter instead."""
        with self._dropout_scope():
            return self._forward(args, adapter_names, kwargs)

    def _forward(self, args: tuple, adapter_names: Sequence[str] | None, kwargs: dict):
        if adapter_names is not None:
            return call_model_mixed(self, self.base_model, adapter_names, args, kwargs)
        live = self._live_model_adapters()
        if not live:
            return self.base_model(*args, **kwargs)
        kwargs = self._as_keywords(args, kwargs)
        for adapter in live:
            kwargs = adapter.transform_inputs(self.base_model, kwargs)
        outputs = self.base_model(**kwargs)
        for adapter in live:
            outputs = adapter.transform_outputs(self.base_model, outputs, kwargs)
        return outputs

    def _dropout_scope(self) -> contextlib.AbstractContextManager:
        """Where the call trains on a CPU: every dropout mask from deltatune's generator (see
        :attr:`cpu_dropout`). Not under ``torch.compile``, and not with gradient checkpointing,
        whose second run of the blocks falls outside this call (the trainer covers that case)."""
        if not (self.training and self.cpu_dropout) or torch.compiler.is_compiling():
            return contextlib.nullcontext()
        first = next(self.base_model.parameters(), None)
        if first is None or first.device.type != "cpu":
            return contextlib.nullcontext()
        if self._dropout_sites is None:
            self._dropout_sites = CpuDropout(self)
        sites = self._dropout_sites
        return contextlib.nullcontext() if sites.checkpointing() else sites.active()

    def generate(self, *args, adapter_names: Sequence[str] | None = None, **kwargs):
        """The base model's ``generate``; ``adapter_names`` as in :meth:`forward`."""
        if adapter_names is not None:
            if kwargs.get("num_beams", 1) > 1:
                raise AdapterError("mixed-adapter generation supports greedy and sampling, not beam search")
            return call_model_mixed(self, self.base_model.generate, adapter_names, args, kwargs)
        live = self._live_model_adapters()
        if live:
            kwargs = self._as_keywords(args, kwargs)
            args = ()
            for adapter in live:
                kwargs = adapter.transform_generate_inputs(self.base_model, kwargs)
        return self.base_model.generate(*args, **kwargs)

    def check_mixable(self, names: Sequence[str]) -> None:
        """Raise :class:`AdapterError` unless every adapter in ``names`` can take part in a
        mixed-adapter batch (``adapter_names=``); see :func:`core.routing.check_mixable`."""
        check_mixable(self, names)

    def _live_model_adapters(self) -> list[ModelAdapter]:
        if self._adapters_disabled:
            return []
        return [self.model_adapters[n] for n in self.active_adapters if n in self.model_adapters]

    @staticmethod
    def _as_keywords(args: tuple, kwargs: dict) -> dict:
        # model adapters rewrite inputs by name; a positional first argument is input_ids
        if len(args) > 1:
            raise TypeError("pass inputs by keyword (input_ids=..., attention_mask=...) when a prompt adapter is active")
        return {"input_ids": args[0], **kwargs} if args else dict(kwargs)

    def __getattr__(self, name: str):
        return read_through(self, name, "base_model")

    # --- adapters -------------------------------------------------------------------------
    @property
    def adapter_names(self) -> list[str]:
        return list(self.configs)

    @property
    def active_adapter(self) -> str | None:
        """The active adapter (the first, when several are active together)."""
        return self.active_adapters[0] if self.active_adapters else None

    def adapter_layers(self) -> Iterator[tuple[str, AdapterLayer]]:
        """``(path, wrapper)`` for every adapter wrapper, paths relative to the base model."""
        yield from list(self._layer_index.items())

    def _reindex(self) -> None:
        # Wrappers only appear or go in add/_drop/_unwrap, so keeping this index there makes
        # lookups cheap. The full walk is the fallback; it also ranks every path in model order
        # (a wrapper takes the path of the module it wraps), which keeps adapter_layers() in
        # model order when add() indexes new wrappers without a walk.
        modules = list(self.base_model.named_modules())
        self._module_rank = {path: i for i, (path, _) in enumerate(modules)}
        self._layer_index = {path: module for path, module in modules if isinstance(module, AdapterLayer)}
        self._dropout_sites = None

    def _index_new_wrappers(self, paths: Sequence[str]) -> None:
        # Methods return the paths they wrapped (Method.inject); a path that holds no
        # wrapper, or one the model did not have before, means the structure changed in ways
        # the index cannot follow, so walk the model instead.
        # a wrapper already indexed at a path is the one the method reused (wrapped() keeps it)
        found = {p: submodule(self.base_model, p) for p in paths if p not in self._layer_index}
        if not all(isinstance(m, AdapterLayer) and p in self._module_rank for p, m in found.items()):
            self._reindex()
            return
        if not found:
            return
        merged = {**self._layer_index, **found}
        self._layer_index = dict(sorted(merged.items(), key=lambda item: self._module_rank[item[0]]))

    def add(self, config: MethodConfig, name: str = "default", *, trainable: bool = True) -> "AdaptedModel":
        """Add adapter ``name`` described by ``config``. The first adapter becomes active."""
        if not isinstance(config, MethodConfig):
            raise ConfigError(f"expected a method config such as dt.LoraConfig(...), got {type(config).__name__}")
        if name in self.configs:
            raise AdapterError(f"an adapter named {name!r} exists already; remove it or pick another name")
        if not name or name == BASE_ADAPTER or "." in name:
            raise AdapterError(f"{name!r} cannot name an adapter (empty, reserved, or contains '.')")
        spec = registry.for_config(config)
        config = self._complete(config)
        try:
            saved = self._wrap_modules_to_save(config, name)
            paths = spec.method.inject(self.base_model, config, name)
        except Exception:
            self._reindex()
            self._drop(name)
            raise
        self._index_new_wrappers([*saved, *paths])
        model_adapter = spec.method.build_model_adapter(self.base_model, config, name)
        if model_adapter is not None:
            self.model_adapters[name] = model_adapter
        self._dropout_sites = None  # the new modules may hold dropout
        extras = spec.method.extra_trainable(self.base_model, config, paths)
        self._shared.add(name, [n for n in extras if not any(n.startswith(s + ".") for s in saved)])
        layer_paths = [p for p in paths if not getattr(self._layer_index.get(p), "adapts_parameters", False)]
        changes = config.exact_targets(compact_targets(self.base_model, layer_paths)) if layer_paths else {}
        self.configs[name] = config.replace(modules_to_save=saved, **changes)  # one copy: each is validated
        if trainable:
            self._trainable.add(name)
        self.use(self.active_adapters or name)
        return self

    def _complete(self, config: MethodConfig) -> MethodConfig:
        base_cfg = getattr(self.base_model, "config", None)
        changes = {}
        if config.task_type is None:
            changes["task_type"] = task_type_of(self.base_model)
        if config.base_model is None and base_cfg is not None:
            changes["base_model"] = getattr(base_cfg, "_name_or_path", None) or None
        if config.modules_to_save is None:
            changes["modules_to_save"] = tuple(classification_head_names(self.base_model))
        return config.replace(**changes) if changes else config

    def _wrap_modules_to_save(self, config: MethodConfig, name: str) -> tuple[str, ...]:
        wanted = config.modules_to_save or ()
        modules = visible_modules(self.base_model)
        # peft's bare-suffix rule ("classifier" takes "pre_classifier" too): files mean the same in both
        found = [p for p in modules if any(p.endswith(w) for w in wanted)]
        if wanted and not found:
            raise TargetError(f"modules_to_save {list(wanted)} match no module; top-level modules: "
                              f"{', '.join(n for n, _ in self.base_model.named_children())}")
        for path in found:
            wrapped(self.base_model, path, ModulesToSave, "modules_to_save").add_adapter(name)
        return tuple(found)

    def use(self, names: str | Sequence[str]) -> "AdaptedModel":
        """Make ``names`` the active adapter(s); only active, trainable adapters get gradients."""
        names = [names] if isinstance(names, str) else list(names)
        for n in names:
            self._check(n)
        owner = self._shared.owner_among(names)
        self.active_adapters = names
        for _, layer in self.adapter_layers():
            layer.set_active(names)
        self._shared.activate(owner)
        self._refresh_trainable()
        return self

    def _refresh_trainable(self) -> None:
        live = {n for n in self.active_adapters if n in self._trainable}
        for n, adapter in self.model_adapters.items():
            for p in adapter.parameters():
                p.requires_grad_(n in live)
        # adapters frozen by the last refresh and not live now are left alone: with several
        # adapters loaded, walking all their parameters on every add/use dominated loading
        settled = self._frozen_adapters - live
        for _, layer in self.adapter_layers():
            for n in layer.adapter_names:
                if n not in settled:
                    for p in layer.adapter_parameters(n):
                        p.requires_grad_(n in live)
        self._frozen_adapters = set(self.configs) - live
        self._shared.set_trainable(live)

    def set_trainable(self, name: str, trainable: bool = True) -> None:
        """Mark adapter ``name`` as trained (its parameters get gradients while active) or frozen."""
        self._check(name)
        (self._trainable.add if trainable else self._trainable.discard)(name)
        self._refresh_trainable()

    def _check(self, name: str) -> None:
        if name not in self.configs:
            raise AdapterError(f"no adapter named {name!r}; adapters: {self.adapter_names or 'none'}")

    def remove(self, name: str) -> None:
        """Delete adapter ``name``; layers left without adapters get their original module back."""
        self._check(name)
        self._drop(name)
        remaining = [n for n in self.active_adapters if n != name]
        self.use(remaining or self.adapter_names[:1])

    def _drop(self, name: str) -> None:
        for path, layer in list(self.adapter_layers()):
            if name in layer.adapter_names:
                layer.remove_adapter(name)
            if not layer.adapter_names:  # also a wrapper whose adapter failed half-way in
                self.base_model.set_submodule(path, layer.base_layer)
                del self._layer_index[path]
        if name in self.model_adapters:
            del self.model_adapters[name]
        self._dropout_sites = None
        self.configs.pop(name, None)
        self._shared.remove(name)
        self._trainable.discard(name)
        self._frozen_adapters.discard(name)

    @contextlib.contextmanager
    def disabled(self) -> Iterator["AdaptedModel"]:
        """Within the block the model computes exactly the base model's output."""
        layers = [layer for _, layer in self.adapter_layers()]
        merged = {id(layer): list(layer.merged_adapters) for layer in layers}
        for layer in layers:
            layer.unmerge()
            layer.adapters_disabled = True
        self._adapters_disabled = True
        owner = self._shared.owner
        self._shared.activate(None)
        try:
            yield self
        finally:
            self._shared.activate(owner)
            self._adapters_disabled = False
            for layer in layers:
                layer.adapters_disabled = False
                if merged[id(layer)]:
                    layer.merge(merged[id(layer)])

    # --- merging --------------------------------------------------------------------------
    def merge(self, names: str | Sequence[str] | None = None) -> None:
        """Bake the active (or the named) adapters into the base weights."""
        names = self.active_adapters if names is None else ([names] if isinstance(names, str) else list(names))
        merging.merge(self, names)

    def training_penalty(self) -> torch.Tensor | None:
        """The regularisation term the active adapters' methods add to the training loss (e.g.
        diff pruning's L0 penalty), or None when no active method has one."""
        terms = []
        for method in {type(self.configs[n]).method for n in self.active_adapters}:
            term = registry.get(method).method.training_penalty(self)
            if term is not None:
                terms.append(term)
        return torch.stack(terms).sum() if terms else None

    def unmerge(self) -> None:
        """Take every merged adapter out of the base weights again."""
        for _, layer in self.adapter_layers():
            layer.unmerge()

    @property
    def merged(self) -> bool:
        return any(layer.merged_adapters for _, layer in self.adapter_layers())

    def merge_and_unload(self, requantize: bool = False) -> nn.Module:
        """Merge the active adapters and return the plain base model (heads: the trained copy).

        Quantized (k-bit) layers are dequantized first, so the result is a full-precision model.
        ``requantize=True`` quantizes the merged layers again, which loses accuracy: the
        quantization error now also hits the learned update.
        """
        return merging.merge_and_unload(self, requantize)

    def unload(self) -> nn.Module:
        """Remove every adapter without merging and return the original base model."""
        self.unmerge()
        self._shared.activate(None)
        return merging.unwrap(self, keep_trained_heads=False)

    def _forget_adapters(self) -> None:
        """Clear the bookkeeping after the wrappers are gone (``merging.unwrap``)."""
        self._reindex()
        self.model_adapters = nn.ModuleDict()
        self.configs.clear()
        self._frozen_adapters.clear()
        self._shared = SharedParameterValues(self.base_model)
        self.active_adapters = []

    # --- many adapters (implemented in deltatune.compose, which provides them) --------------
    def combine(self, weights: dict[str, float], name: str, how: str = "cat", rank: int | None = None, **options):
        """Add adapter ``name``, a weighted combination of LoRA adapters (how, options: compose.combine)."""
        return _provided("combine")(self, weights, name, how=how, rank=rank, **options)

    def hot_swap(self, name: str, directory: str) -> None:
        """Replace adapter ``name``'s weights in place from a file (see compose.swap)."""
        _provided("hot_swap")(self, name, directory)

    # --- reporting and files --------------------------------------------------------------
    def parameter_counts(self) -> tuple[int, int]:
        """``(trainable, total)`` parameter counts. The total holds the base model and what the
        adapters add (a saved head's trained copy too, as peft counts it); the frozen originals
        that the freeze methods (``full``, ``freeze``) replace with trained copies count once."""
        # a quantized weight packs several parameters per element: count the layer's real size
        packed = {id(m.weight): m.in_features * m.out_features for m in self.modules() if handler_for(m) is not None}
        replaced = {id(p) for _, layer in self.adapter_layers()
                    if isinstance(layer, ModulesToSave) and not layer.original_counted
                    for p in layer.base_layer.parameters()}
        total = trainable = 0
        for p in self.parameters():
            if id(p) in replaced:
                continue
            n = packed.get(id(p), p.numel())
            total += n
            trainable += n if p.requires_grad else 0
        return trainable, total

    def report(self) -> str:
        """A per-module table of the adapters and a trainable-parameter summary line."""
        return format_report(self)

    def save(self, directory: str, adapter: str | None = None, *, format: str = "peft") -> None:
        """Write ``adapter`` (default: the active one) as a PEFT folder, or as diffusers' LoRA file."""
        from deltatune.core.diffusers_files import writer_for
        writer_for(format)(self, directory, adapter or self.active_adapter)

    def load(self, directory: str, name: str = "default", *, trainable: bool = False,
             allow_nonfinite: bool = False) -> "AdaptedModel":
        """Add an adapter from a deltatune, HF PEFT or diffusers LoRA folder under ``name`` (not
        made active unless it is the only adapter). Weights with NaN or Inf values are refused
        unless ``allow_nonfinite``."""
        from deltatune.core.diffusers_files import reader_for
        from deltatune.core.state import load_adapter
        load_adapter(self, directory, name, trainable=trainable, allow_nonfinite=allow_nonfinite,
                     read=reader_for(directory))
        return self
