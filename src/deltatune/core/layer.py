"""The wrapper every weight-space method builds on, and the trainable-copy wrapper.

A wrapper holds the user's module as ``base_layer`` and one entry per adapter name in
``ModuleDict``/``ParameterDict`` attributes (``adapter_attrs``). Written once here: the forward
that routes mixed-adapter batches (:mod:`deltatune.core.routing`) and otherwise calls the
method's per-adapter forward, and the merge on top of ``delta_weight(name)``.
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
from typing import ClassVar, Iterable

import torch
from torch import nn

from deltatune.errors import AdapterError, AdapterFileError


_FILLED_FROM_FILE = contextvars.ContextVar("deltatune_filled_from_file", default=False)


@contextlib.contextmanager
def weights_from_file():
    """Within the block, adapters being added get their tensors from a file right after, so
    wrappers may skip their random initialisation (it costs more than the load itself). The
    loader checks that the file fills every tensor, so no uninitialised value survives."""
    token = _FILLED_FROM_FILE.set(True)
    try:
        yield
    finally:
        _FILLED_FROM_FILE.reset(token)


def needs_initial_values() -> bool:
    """False inside :func:`weights_from_file`: new adapter tensors will be overwritten."""
    return not _FILLED_FROM_FILE.get()


def adapter_dtype(base: torch.Tensor) -> torch.dtype:
    """The dtype new adapter tensors take next to the base tensor ``base``: its own when that is
    fp32/fp64, else fp32 (adapters train in fp32 over a half-precision or quantized base)."""
    return base.dtype if base.dtype in (torch.float32, torch.float64) else torch.float32


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a fused autograd node computes in: autocast's where it is on, else ``x``'s."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


def linear_layout(module: nn.Module) -> tuple[bool, int, int]:
    """``(fan_in_fan_out, in_features, out_features)`` of an ``nn.Linear`` (quantized ones too:
    their packed weight's shape says nothing, their attributes do) or a GPT-2 ``Conv1D``, whose
    weight is stored ``[in, out]``."""
    if isinstance(module, nn.Linear):
        return False, module.in_features, module.out_features
    in_features, out_features = module.weight.shape
    return True, in_features, out_features


def linear_kinds() -> tuple[type, ...]:
    """Layer types that count as linear: ``nn.Linear`` and GPT-2's ``Conv1D``."""
    # no functools cache: the LoRA and IA3 forwards call this, and torch.compile warns about a
    # cache it cannot see through; the import of a loaded module is a dictionary lookup
    from transformers.pytorch_utils import Conv1D
    return (nn.Linear, Conv1D)


def read_through(module: nn.Module, name: str, inner: str):
    """``module``'s attribute ``name``, else that of its submodule ``inner``: a wrapper's
    ``__getattr__``, since model code reads attributes of the modules it wraps (T5 checks
    ``self.wo.weight.dtype``; users read ``model.config``)."""
    try:
        return nn.Module.__getattr__(module, name)
    except AttributeError:
        if name == inner:
            raise
        return getattr(nn.Module.__getattr__(module, inner), name)


class AdapterLayer(nn.Module):
    """Base of every wrapper: adapter bookkeeping, file state, and the merge algebra."""

    #: names of the ModuleDict/ParameterDict attributes keyed by adapter name
    adapter_attrs: ClassVar[tuple[str, ...]] = ()
    #: whether ``delta_weight`` exists, i.e. the adapter can be baked into the base weight
    mergeable: ClassVar[bool] = False
    #: whether it adapts named parameters of its module (peft's ``target_parameters``) rather
    #: than the module as a layer; such paths stay out of the saved ``target_modules``
    adapts_parameters: ClassVar[bool] = False
    #: whether its rows can go through different adapters in one call; the router refuses a
    #: mixed-adapter batch with a clear error where they cannot
    mixes_rows: ClassVar[bool] = True

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self.adapters_disabled = False
        #: set during a mixed-adapter call: the :class:`~deltatune.core.routing.RowRouting` that
        #: sends each row through its own adapter
        self.routing = None

    # Models read their layers' weights directly (T5 checks ``wo.weight.dtype``; tying code
    # reads ``.weight``): a wrapper answers with its base layer's.
    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    # --- forward --------------------------------------------------------------------------
    def forward(self, *args, **kwargs):
        """The wrapped module's output with the adapters applied: in a mixed-adapter batch each row
        through its own adapter (see :mod:`deltatune.core.routing`), else the active ones, by
        :meth:`adapted_forward`."""
        if self.routing is not None:
            return self.routing(self, *args, **kwargs)
        return self.adapted_forward(*args, **kwargs)

    def adapted_forward(self, *args, **kwargs):
        """The one forward each method writes: the base layer's output with the active adapters
        applied (:meth:`unmerged_active`; none while disabled, merged ones are in the weights)."""
        raise NotImplementedError(f"{type(self).__name__} does not define adapted_forward")

    # --- bookkeeping ----------------------------------------------------------------------
    @property
    def adapter_names(self) -> list[str]:
        """Adapters present in this layer, in the order they were added."""
        return list(self._container(self.adapter_attrs[0]).keys())

    def _container(self, attr: str) -> nn.Module:
        # the per-adapter ModuleDict/ParameterDict; read from _modules directly because
        # nn.Module.__getattr__ is slow and these lookups run per layer on every add/use
        return self._modules[attr]

    def unmerged_active(self) -> list[str]:
        """The active adapters this layer still has to apply in its forward (none while
        disabled; merged ones are in the weights already)."""
        if self.adapters_disabled:
            return []
        return [n for n in self.active_adapters if n not in self.merged_adapters]

    def set_active(self, names: Iterable[str]) -> None:
        self.active_adapters = [n for n in names if n in self.adapter_names]

    def remove_adapter(self, name: str) -> None:
        if name in self.merged_adapters:
            self.unmerge()
        for attr in self.adapter_attrs:
            container = self._container(attr)
            if name in container:
                del container[name]
        self.active_adapters = [n for n in self.active_adapters if n != name]
        self._forget(name)

    def _forget(self, name: str) -> None:
        """Drop per-adapter settings kept outside the adapter containers."""

    def adapter_parameters(self, name: str) -> list[nn.Parameter]:
        params: list[nn.Parameter] = []
        for attr in self.adapter_attrs:
            container = self._container(attr)
            entry = container[name] if name in container else None
            if isinstance(entry, nn.Parameter):
                params.append(entry)
            elif isinstance(entry, nn.Module):
                # a leaf module's own dict: Module.parameters() costs ten times more, and this
                # runs for every layer whenever the active adapters change
                own = entry._parameters.values() if not entry._modules else entry.parameters()
                params.extend(p for p in own if p is not None)
        return params

    # --- file state -----------------------------------------------------------------------
    def adapter_state(self, name: str) -> dict[str, torch.Tensor]:
        """This layer's tensors of adapter ``name``, keyed as in a PEFT file (name removed)."""
        out: dict[str, torch.Tensor] = {}
        for attr in self.adapter_attrs:
            container = self._container(attr)
            if name not in container:
                continue
            entry = container[name]
            if isinstance(entry, torch.Tensor):
                out[attr] = entry
            else:
                out.update({f"{attr}.{k}": v for k, v in _module_state(entry).items()})
        return out

    def file_state(self, name: str) -> dict[str, torch.Tensor]:
        """The tensors a file stores for adapter ``name``: :meth:`adapter_state`, unless a method
        saves its adapter in another (portable) form."""
        return self.adapter_state(name)

    def load_adapter_state(self, name: str, tensors: dict[str, torch.Tensor], where: str) -> None:
        """Copy ``tensors`` into adapter ``name``, checking every key and shape first."""
        tensors = self._without_base_copies(tensors, where)
        current = self.adapter_state(name)
        missing = sorted(set(current) - set(tensors))
        extra = sorted(set(tensors) - set(current))
        if missing or extra:
            raise AdapterFileError(
                f"adapter file does not fit layer {where}: missing {missing or 'nothing'}, "
                f"unexpected {extra or 'nothing'}")
        for key, value in sorted(tensors.items()):
            if value.dtype.is_floating_point != current[key].dtype.is_floating_point:
                raise AdapterFileError(f"adapter file does not fit layer {where}: {key} has dtype {value.dtype} in the "
                                       f"file but {current[key].dtype} in the model; the file is damaged")
            if tuple(value.shape) != tuple(current[key].shape):
                raise AdapterFileError(
                    f"adapter file does not fit layer {where}: {key} has shape {tuple(value.shape)} in the "
                    f"file but {tuple(current[key].shape)} in the model (a different rank or base model?)")
        with torch.no_grad():
            for key, value in tensors.items():
                current[key].copy_(value.to(dtype=current[key].dtype))

    def _without_base_copies(self, tensors: dict[str, torch.Tensor], where: str) -> dict[str, torch.Tensor]:
        """Drop copies of the frozen base tensors that PEFT files may carry (it saves the full
        embedding matrix when embeddings are adapted); a copy that differs from this model's
        means the adapter was trained on another base (e.g. a resized vocabulary)."""
        if not any(k.startswith("base_layer.") for k in tensors):
            return tensors
        base = dict(self.base_layer.state_dict())
        kept = {}
        for key, value in tensors.items():
            if not key.startswith("base_layer."):
                kept[key] = value
                continue
            mine = base.get(key.removeprefix("base_layer."))
            if mine is None or mine.shape != value.shape or not torch.equal(mine, value.to(mine.dtype)):
                raise AdapterFileError(
                    f"the adapter file carries its own {where}.{key} that differs from this model's "
                    f"(shape {tuple(value.shape)}): it was trained on another base model, or one with a "
                    f"resized vocabulary; load it onto that base")
        return kept

    # --- merge algebra --------------------------------------------------------------------
    def delta_weight(self, name: str) -> torch.Tensor:
        """The change adapter ``name`` makes to ``base_layer.weight``, in that weight's layout."""
        raise NotImplementedError(f"{type(self).__name__} cannot be merged into the base weights")

    def _base_weight(self) -> torch.Tensor:
        return self.base_layer.weight

    def _mergeable_weight(self, names: Iterable[str]) -> torch.Tensor:
        """The base weight that ``names`` will be merged into, after checking that none of them
        is merged already and that the weight can absorb a change in place."""
        for name in names:
            if name in self.merged_adapters:
                raise AdapterError(f"adapter {name!r} is already merged; call unmerge() first")
        weight = self._base_weight()
        if not weight.is_floating_point():
            raise AdapterError(f"a {type(self.base_layer).__name__} layer is quantized and cannot absorb an adapter "
                               f"exactly in place; use merge_and_unload(), which dequantizes first")
        return weight

    def merge(self, names: Iterable[str] | None = None) -> None:
        """Bake the listed (default: active) adapters into the base weights, one by one through
        :meth:`_merge_into`: the one merge loop, whose hooks the methods fill in."""
        names = [n for n in (self.active_adapters if names is None else names) if n in self.adapter_names]
        weight = self._mergeable_weight(names)
        for name in names:
            self._check_mergeable(name)
        with torch.no_grad():
            for name in names:
                self._merge_into(weight, name)
                self.merged_adapters.append(name)

    def unmerge(self) -> None:
        """Take every merged adapter out again, the last merged first (exact up to float
        rounding, or bit for bit where a method keeps what its merge overwrote)."""
        weight = self._base_weight()
        with torch.no_grad():
            while self.merged_adapters:
                # still listed as merged while it comes out: IA3's delta reads that
                self._unmerge_from(weight, self.merged_adapters[-1])
                self.merged_adapters.pop()

    # the hooks of the merge; the defaults are the additive merge of ``delta_weight`` and ``delta_bias``
    def _check_mergeable(self, name: str) -> None:
        """Raise :class:`AdapterError` where adapter ``name`` cannot be merged now (checked for
        every adapter before any is merged)."""

    def delta_bias(self, name: str) -> torch.Tensor | None:
        """The change adapter ``name`` makes to ``base_layer.bias`` too, or None (most methods)."""
        return None

    def _merge_into(self, weight: torch.Tensor, name: str) -> None:
        """Bake adapter ``name`` into ``weight`` (and the bias, by :meth:`delta_bias`); a method
        whose merge is not additive overrides this pair (DoRA rescales the weight)."""
        delta_bias = self.delta_bias(name)
        weight.data += self.delta_weight(name).to(weight.dtype)
        if delta_bias is not None:
            self.base_layer.bias.data += delta_bias.to(self.base_layer.bias.dtype)

    def _unmerge_from(self, weight: torch.Tensor, name: str) -> None:
        """Undo :meth:`_merge_into` for ``name``, the last adapter merged."""
        delta_bias = self.delta_bias(name)
        weight.data -= self.delta_weight(name).to(weight.dtype)
        if delta_bias is not None:
            self.base_layer.bias.data -= delta_bias.to(self.base_layer.bias.dtype)


class ModulesToSave(AdapterLayer):
    """A trainable full copy of a module (e.g. the classifier head) per adapter."""

    adapter_attrs = ("modules_to_save",)
    #: whether the frozen original counts in ``AdaptedModel.parameter_counts`` beside its copies:
    #: yes for a head saved next to an adapter (as peft counts it), no where the copies are the
    #: model being trained (the freeze methods, full fine-tuning)
    original_counted: ClassVar[bool] = True

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.modules_to_save = nn.ModuleDict()

    def add_adapter(self, name: str) -> None:
        self.modules_to_save[name] = copy.deepcopy(self.base_layer)
        for p in self.modules_to_save[name].parameters():
            p.requires_grad_(True)

    def adapter_state(self, name: str) -> dict[str, torch.Tensor]:
        # PEFT stores the copy under the original module's own keys
        return dict(self.modules_to_save[name].state_dict()) if name in self.modules_to_save else {}

    def _without_base_copies(self, tensors: dict[str, torch.Tensor], where: str) -> dict[str, torch.Tensor]:
        # PEFT files with bias="all" also hold "original_module.*" (the frozen original) and
        # "modules_to_save.*" (a second name for the trained copy's tensors)
        kept = {k: v for k, v in tensors.items() if not k.startswith(("original_module.", "modules_to_save."))}
        for key, value in tensors.items():
            if key.startswith("modules_to_save."):
                kept.setdefault(key.removeprefix("modules_to_save."), value)
        return kept

    def adapted_forward(self, *args, **kwargs):
        if not self.adapters_disabled:
            for name in self.active_adapters:
                return self.modules_to_save[name](*args, **kwargs)
        return self.base_layer(*args, **kwargs)

    def merge(self, names=None) -> None:  # a copy has nothing to merge; merge_and_unload picks it
        pass

    def unmerge(self) -> None:
        pass


class ModelAdapter(nn.Module):
    """An adapter that lives at the model level instead of inside one layer (soft prompts,
    prefixes). While it is active, :class:`AdaptedModel` passes every call's keyword arguments
    through :meth:`transform_inputs` and the result through :meth:`transform_outputs`.

    Methods subclass it and return one from ``Method.build_model_adapter`` (:mod:`deltatune.core.registry`).
    """

    mergeable: ClassVar[bool] = False

    def transform_inputs(self, base_model: nn.Module, kwargs: dict) -> dict:
        """The keyword arguments the base model's forward gets (e.g. with prompts prepended)."""
        return kwargs

    def transform_generate_inputs(self, base_model: nn.Module, kwargs: dict) -> dict:
        """The keyword arguments ``generate`` gets; by default the same as for forward."""
        return self.transform_inputs(base_model, kwargs)

    def transform_outputs(self, base_model: nn.Module, outputs, kwargs: dict):
        """The forward's outputs as the caller sees them (e.g. prompt positions removed)."""
        return outputs

    def file_state(self) -> dict[str, torch.Tensor]:
        """Tensors to save, keyed as HF PEFT names them (e.g. ``prompt_embeddings``)."""
        return {}

    def load_file_state(self, tensors: dict[str, torch.Tensor]) -> None:
        """Copy saved tensors back in, after checking keys and shapes (raising
        :class:`AdapterFileError` when they do not fit). Each adapter kind knows how its saved
        state maps back onto its modules (prompt encoders fold into a table), so it implements this."""
        raise NotImplementedError


def _module_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """``module.state_dict()``; read from its own dicts for a plain leaf module (a LoRA factor),
    where ``state_dict``'s generality cost more than the copy of the values on every load."""
    plain = (not module._modules and not module._state_dict_hooks and not module._state_dict_pre_hooks
             and type(module)._save_to_state_dict is nn.Module._save_to_state_dict)
    if not plain:
        return module.state_dict()
    out = {k: v.detach() for k, v in module._parameters.items() if v is not None}
    out.update({k: v.detach() for k, v in module._buffers.items()
                if v is not None and k not in module._non_persistent_buffers_set})
    return out
