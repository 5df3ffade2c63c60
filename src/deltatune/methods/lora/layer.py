"""LoRA wrappers for nn.Linear / GPT-2 Conv1D, nn.Embedding and nn.Conv2d.

Parameter layout and names follow HF PEFT (``lora_A.<name>.weight`` of shape ``[r, in]``,
``lora_B.<name>.weight`` of shape ``[out, r]``; ``lora_embedding_A/B`` for embeddings), so
files map one to one.

Every wrapper shows its update through one factor interface, :meth:`LoraLayer.factors` and
:meth:`LoraLayer.set_factors` (``scale * B @ A`` as two matrices, whatever the layer kind), on
which ``delta_weight`` (merging), combination and hot swap (:mod:`deltatune.compose`) are built.

Where the update is computed on activations (LoraLinear; the other kinds have one path):

- fused (:mod:`.fused`): one autograd node, when the layer's only unmerged adapter is plain LoRA
  on a frozen ``nn.Linear``/``Conv1D`` (the common training and inference case);
- plain (``adapted_forward``): the base output plus one ``addmm`` per adapter, for everything else
  (several adapters, DoRA, a trainable or quantized base weight, ``use_fused = False``);
- :meth:`LoraLinear.add_delta_`: a mixed-adapter batch's rows, on a base output computed once
  for the whole batch (:mod:`deltatune.core.routing`); on CUDA
  :meth:`LoraLinear.adapter_delta_gathered` does all rows in two batched matmuls instead.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from deltatune.core.dropout import scoped_dropout
from deltatune.core.layer import AdapterLayer, adapter_dtype, linear_kinds, linear_layout, needs_initial_values
from deltatune.errors import AdapterError, AdapterFileError, TargetError
from deltatune.methods.lora import dora
from deltatune.methods.lora.factors import FactorLinear, LoraFactors, as_matrix, init_factors
from deltatune.methods.lora.init import InitialFactors, initial_factors, is_data_init, is_reproducible
from deltatune.methods.lora.fused import LoraLinearFunction


def lora_scaling(r: int, alpha: float, use_rslora: bool) -> float:
    """``alpha / r``, or ``alpha / sqrt(r)`` for rank-stabilised LoRA."""
    return alpha / (math.sqrt(r) if use_rslora else r)


class LoraLayer(AdapterLayer):
    """Per-adapter rank, scale and dropout shared by every LoRA wrapper, and the factor interface."""

    mergeable = True

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.r: dict[str, int] = {}
        self.scaling: dict[str, float] = {}
        self.dropout_p: dict[str, float] = {}
        #: per merged DoRA adapter, the column scale its merge multiplied the weight by
        self._dora_merge_scale: dict[str, torch.Tensor] = {}

    def _set_hparams(self, name: str, r: int, alpha: float, dropout: float, use_rslora: bool) -> None:
        self.r[name] = r
        self.scaling[name] = lora_scaling(r, alpha, use_rslora)
        self.dropout_p[name] = float(dropout)

    def _forget(self, name: str) -> None:
        for d in (self.r, self.scaling, self.dropout_p, self._dora_merge_scale):
            d.pop(name, None)

    # --- DoRA (see dora.py); only LoraLinear and LoraEmbedding hold magnitudes ----------------
    #: whether the base weight is stored ``[in, out]`` (GPT-2 Conv1D, embedding tables)
    stored_transposed: bool = False

    def is_dora(self, name: str) -> bool:
        return name in self._modules.get("lora_magnitude_vector", ())

    def lora_factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A, B)`` of adapter ``name`` as stored: ``[r, in]`` and ``[out, r]`` (a conv's kernels:
        ``[r, in, kh, kw]`` and ``[out, r, 1, 1]``). Code outside the layer uses :meth:`factors`."""
        return self._factor_parameters(name)

    def _factor_parameters(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The parameters that hold A and B."""
        return self.lora_A[name].weight, self.lora_B[name].weight

    # --- the factor interface ----------------------------------------------------------------
    def factors(self, name: str) -> LoraFactors:
        """Adapter ``name``'s update as :class:`LoraFactors`: the live parameters seen as matrices
        (for PiSSA/OLoRA, the rank-2r pair they equal on the original weights; for DoRA, the
        factors of the direction's update, without the magnitude)."""
        a, b = self.lora_factors(name)
        return LoraFactors(as_matrix(a), as_matrix(b), self.scaling[name])

    def check_factors(self, name: str, a: torch.Tensor, b: torch.Tensor) -> None:
        """Raise :class:`AdapterError` unless :meth:`set_factors` can write ``a``, ``b`` into adapter ``name``."""
        have_a, have_b = (as_matrix(t) for t in self._factor_parameters(name))
        r, fan_in, out = have_a.shape[0], have_a.shape[1], have_b.shape[0]
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] > r or a.shape[1] != fan_in or tuple(b.shape) != (out, a.shape[0]):
            raise AdapterError(f"factors {tuple(a.shape)} / {tuple(b.shape)} do not fit the loaded {(r, fan_in)} / "
                               f"{(out, r)} (rank may only shrink)")

    def set_factors(self, name: str, a: torch.Tensor, b: torch.Tensor) -> None:
        """Overwrite adapter ``name``'s factors in place with ``a`` ``[r', fan_in]`` and ``b``
        ``[out, r']`` (the :class:`LoraFactors` layout), ``r'`` at most the adapter's rank: a
        smaller rank is zero-padded, which is exact. The adapter's scale stays (see :meth:`rescale`)."""
        self._check_plain(name)
        self.check_factors(name, a, b)
        weight_a, weight_b = self._factor_parameters(name)
        with torch.no_grad():
            weight_a.zero_()
            weight_b.zero_()
            as_matrix(weight_a)[: a.shape[0]].copy_(a)
            as_matrix(weight_b)[:, : a.shape[0]].copy_(b)

    def rescale(self, name: str, factor: float) -> None:
        """Multiply adapter ``name``'s update by ``factor`` in place, folded into B: the layer's
        scale (a constant that compiled graphs may have captured) stays as it is."""
        self._check_plain(name)
        with torch.no_grad():
            self._factor_parameters(name)[1].mul_(factor)

    def _check_plain(self, name: str) -> None:
        if name in self._modules.get("lora_initial", ()):
            raise AdapterError(f"adapter {name!r} is a PiSSA/OLoRA adapter, whose factors start from the base "
                               f"weight: its factors cannot be replaced in place; load the new ones as a new adapter")

    def delta_weight(self, name: str) -> torch.Tensor:
        if self.is_dora(name):
            return _dora_delta_weight(self, name)
        update = self.factors(name)
        return self._in_stored_layout((update.b @ update.a) * update.scale)

    def _in_stored_layout(self, delta: torch.Tensor) -> torch.Tensor:
        """An ``[out, fan_in]`` update in the base weight's own layout."""
        return delta.t() if self.stored_transposed else delta

    def _add_magnitude(self, name: str, use_dora: bool) -> None:
        if not use_dora:
            return
        a, b = self.lora_factors(name)
        magnitude = dora.initial_magnitude(self, name) if needs_initial_values() else a.new_empty(b.shape[0])
        self.lora_magnitude_vector[name] = nn.Parameter(magnitude)

    def _merge_into(self, weight: torch.Tensor, name: str) -> None:
        if not self.is_dora(name):
            return super()._merge_into(weight, name)
        merged, self._dora_merge_scale[name] = dora.merged_weight(self, name)
        weight.data.copy_(merged.to(weight.dtype))

    def _unmerge_from(self, weight: torch.Tensor, name: str) -> None:
        if name not in self._dora_merge_scale:
            return super()._unmerge_from(weight, name)
        scale = self._dora_merge_scale.pop(name)
        weight.data.copy_(dora.unmerged_weight(self, name, weight.data, scale).to(weight.dtype))

    def _dropped(self, x: torch.Tensor, name: str) -> torch.Tensor:
        p = self.dropout_p[name]
        return scoped_dropout(x, p, training=True) if p > 0 and self.training else x


class LoraLinear(LoraLayer):
    """LoRA on ``nn.Linear`` or GPT-2 ``Conv1D`` (whose weight is stored ``[in, out]``)."""

    adapter_attrs = ("lora_A", "lora_B", "lora_magnitude_vector")

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.fan_in_fan_out, self.in_features, self.out_features = linear_layout(base_layer)
        self.stored_transposed = self.fan_in_fan_out
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_magnitude_vector = nn.ParameterDict()
        #: frozen initial factors of PiSSA/OLoRA adapters (see init.py); not in files
        self.lora_initial = nn.ModuleDict()

    def add_adapter(self, name: str, r: int, alpha: float, dropout: float = 0.0,
                    init: str = "kaiming", use_rslora: bool = False, use_dora: bool = False) -> None:
        weight = self.base_layer.weight
        kw = {"device": weight.device, "dtype": adapter_dtype(weight)}
        a = FactorLinear(self.in_features, r, **kw)
        b = FactorLinear(r, self.out_features, **kw)
        if is_data_init(init):
            self._start_from_base_weight(a.weight, b.weight, name, r, lora_scaling(r, alpha, use_rslora), init)
        else:
            init_factors(a.weight, b.weight, r, init)
        self.lora_A[name], self.lora_B[name] = a, b
        self._set_hparams(name, r, alpha, dropout, use_rslora)
        self._add_magnitude(name, use_dora)

    def _start_from_base_weight(self, a: torch.Tensor, b: torch.Tensor, name: str, r: int, scale: float,
                                init: str) -> None:
        """PiSSA/OLoRA: A, B and the frozen A0, B0 start on a rank-r part of the base weight."""
        if not needs_initial_values() and not is_reproducible(init):
            raise AdapterFileError(
                f"this adapter was saved with init_lora_weights={init!r} (a randomized SVD) and without converting "
                f"it to a plain LoRA, so its starting point cannot be rebuilt; save it again from peft with "
                f"path_initial_model_for_weight_conversion, or from deltatune, which converts")
        weight = dora.dense_base_weight(self.base_layer)
        a0, b0 = initial_factors(weight.t() if self.stored_transposed else weight, r, scale, init)
        with torch.no_grad():
            a.copy_(a0)
            b.copy_(b0)
        self.lora_initial[name] = InitialFactors(a0.to(a.dtype), b0.to(b.dtype))

    def lora_factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A, B)``; for PiSSA/OLoRA the rank-2r pair ``[A; A0]``, ``[B, -B0]`` that applies
        ``s (B A - B0 A0)`` to the original weights."""
        a, b = self.lora_A[name].weight, self.lora_B[name].weight
        if name not in self.lora_initial:
            return a, b
        start = self.lora_initial[name]
        return torch.cat([a, start.a]), torch.cat([b, -start.b], dim=1)

    def file_state(self, name: str) -> dict[str, torch.Tensor]:
        state = self.adapter_state(name)
        if name in self.lora_initial:
            state["lora_A.weight"], state["lora_B.weight"] = self.lora_factors(name)
        return state

    def _forget(self, name: str) -> None:
        super()._forget(name)
        if name in self.lora_initial:
            del self.lora_initial[name]

    #: take the fused single-node path where it applies (see fused.py); tests compare both paths.
    use_fused: bool = True

    def _fusable(self, names: list[str]) -> bool:
        base = self.base_layer
        return (self.use_fused and len(names) == 1 and type(base) in linear_kinds() and not base.weight.requires_grad
                and not self.is_dora(names[0]))

    def adapted_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        names = self.unmerged_active()
        # the fused path: one plain adapter on a frozen nn.Linear/Conv1D (see the module docstring)
        if not args and not kwargs and self._fusable(names):
            base, name = self.base_layer, names[0]
            dropped = self._dropped(x, name)
            return LoraLinearFunction.apply(x, None if dropped is x else dropped, base.weight, base.bias,
                                            *self.lora_factors(name), self.scaling[name], self.fan_in_fan_out)
        # the plain path: everything else (several adapters, DoRA, a trainable or quantized base)
        result = self.base_layer(x, *args, **kwargs)
        base_out = None  # the bias-free base output, for DoRA adapters
        for name in names:
            if self.is_dora(name):
                if len(names) == 1 and not (self.training and self.dropout_p[name] > 0):
                    a, b = self.lora_factors(name)
                    return dora.sole_adapter_output(self, name, result, F.linear(x.to(a.dtype), a), b)
                if base_out is None:
                    bias = self.base_layer.bias
                    base_out = result if bias is None else result - bias
                result = result + self._dora_delta(x, name, base_out).to(result.dtype)
                continue
            a, b = self.lora_factors(name)
            xa = F.linear(self._dropped(x, name).to(a.dtype), a)
            # addmm folds the scale and the residual add into the second matmul
            flat = torch.addmm(result.reshape(-1, result.shape[-1]), xa.reshape(-1, xa.shape[-1]).to(result.dtype),
                               b.t().to(result.dtype), alpha=self.scaling[name])
            result = flat.view(result.shape)
        return result

    def _dora_delta(self, x: torch.Tensor, name: str, base_out: torch.Tensor | None) -> torch.Tensor:
        """DoRA's update for ``x``; ``base_out`` (bias-free) is reused unless dropout changes the input."""
        dropped = self._dropped(x, name)
        if dropped is not x or base_out is None:
            base_out = dora.linear_base_out(self, dropped)
        a, b = self.lora_factors(name)
        return dora.dora_delta(self, name, base_out, F.linear(F.linear(dropped.to(a.dtype), a), b))

    def add_delta_(self, out: torch.Tensor, x: torch.Tensor, name: str) -> None:
        """Add adapter ``name``'s update for input ``x`` to ``out`` in place: the entry point of a
        mixed-adapter batch (:mod:`deltatune.core.routing`), which computes the base output once for
        all rows and adds each adapter's update to its own rows. One ``addmm_`` with the scale
        applied to the small ``x A`` (no full-size temporary) where ``out`` allows it."""
        if self.is_dora(name):
            out += self._dora_delta(x, name, None).to(out.dtype)
            return
        a, b = self.lora_factors(name)
        xa = F.linear(self._dropped(x, name).to(a.dtype), a) * self.scaling[name]
        if out.dtype == a.dtype and out.is_contiguous():
            out.view(-1, out.shape[-1]).addmm_(xa.reshape(-1, xa.shape[-1]), b.t())
        else:
            out += F.linear(xa, b).to(out.dtype)

    def adapter_delta_gathered(self, x: torch.Tensor, names: tuple[str, ...], row_index: torch.Tensor) -> torch.Tensor:
        """Per-row updates in two batched matmuls: row i uses ``names[row_index[i]]`` (no adapter
        when the index is ``len(names)``). Smaller ranks are zero-padded, which is exact."""
        factors = [self.lora_factors(n) for n in names]
        ref = factors[0][0]
        if any(self.is_dora(n) for n in names):  # DoRA rescales the base output: row groups one by one
            out = ref.new_zeros(*x.shape[:-1], self.out_features)
            for i, name in enumerate(names):
                rows = (row_index == i).nonzero().flatten()
                part = out.index_select(0, rows)
                self.add_delta_(part, x.index_select(0, rows), name)
                out.index_copy_(0, rows, part)
            return out
        rank = max(fa.shape[0] for fa, _ in factors)
        a = ref.new_zeros(len(names) + 1, rank, self.in_features)
        b = ref.new_zeros(len(names) + 1, self.out_features, rank)
        for i, (name, (fa, fb)) in enumerate(zip(names, factors)):
            r = fa.shape[0]
            a[i, :r] = fa * self.scaling[name]
            b[i, :, :r] = fb
        rows = x.reshape(x.shape[0], -1, x.shape[-1]).to(ref.dtype)
        xa = torch.bmm(rows, a[row_index].transpose(1, 2))
        return torch.bmm(xa, b[row_index].transpose(1, 2)).view(*x.shape[:-1], self.out_features)


class LoraEmbedding(LoraLayer):
    """LoRA on ``nn.Embedding``: a rank-r lookup table A and a projection B."""

    adapter_attrs = ("lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector")
    stored_transposed = True  # the table is [num, dim]; DoRA's magnitude runs along dim

    def __init__(self, base_layer: nn.Embedding) -> None:
        super().__init__(base_layer)
        self.lora_embedding_A = nn.ParameterDict()
        self.lora_embedding_B = nn.ParameterDict()
        self.lora_magnitude_vector = nn.ParameterDict()

    def _factor_parameters(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        return self.lora_embedding_A[name], self.lora_embedding_B[name]

    def add_adapter(self, name: str, r: int, alpha: float, dropout: float = 0.0,
                    init: str = "kaiming", use_rslora: bool = False, use_dora: bool = False) -> None:
        weight = self.base_layer.weight
        kw = {"device": weight.device, "dtype": adapter_dtype(weight)}
        num, dim = weight.shape
        a = torch.zeros(r, num, **kw) if init != "random" else torch.randn(r, num, **kw)
        b = torch.randn(dim, r, **kw)
        self.lora_embedding_A[name] = nn.Parameter(a)
        self.lora_embedding_B[name] = nn.Parameter(b)
        self._set_hparams(name, r, alpha, dropout, use_rslora)
        self._add_magnitude(name, use_dora)

    def adapted_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = base_out = self.base_layer(x, *args, **kwargs)
        for name in self.unmerged_active():
            result = result + self._delta(x, name, base_out).to(result.dtype)
        return result

    def _delta(self, x: torch.Tensor, name: str, base_out: torch.Tensor | None) -> torch.Tensor:
        base = self.base_layer
        looked_up = F.embedding(x, self.lora_embedding_A[name].t(), base.padding_idx, base.max_norm,
                                base.norm_type, base.scale_grad_by_freq, base.sparse)
        lora_out = looked_up @ self.lora_embedding_B[name].t()
        if not self.is_dora(name):
            return lora_out * self.scaling[name]
        if base_out is None:
            base_out = base(x)
        return dora.dora_delta(self, name, base_out, lora_out)

    def add_delta_(self, out: torch.Tensor, x: torch.Tensor, name: str) -> None:
        """Add adapter ``name``'s update for token ids ``x`` to ``out`` in place (mixed-adapter batches)."""
        out += self._delta(x, name, None).to(out.dtype)


class LoraConv2d(LoraLayer):
    """LoRA on ``nn.Conv2d``: A is a conv with the base kernel into r channels, B a 1x1 conv."""

    adapter_attrs = ("lora_A", "lora_B")

    def __init__(self, base_layer: nn.Conv2d) -> None:
        if base_layer.groups != 1:
            raise TargetError(f"LoRA on grouped convolutions (groups={base_layer.groups}) is not supported")
        super().__init__(base_layer)
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()

    def add_adapter(self, name: str, r: int, alpha: float, dropout: float = 0.0,
                    init: str = "kaiming", use_rslora: bool = False, use_dora: bool = False) -> None:
        base = self.base_layer
        kw = {"device": base.weight.device, "dtype": adapter_dtype(base.weight), "bias": False}
        a = nn.Conv2d(base.in_channels, r, base.kernel_size, base.stride, base.padding, base.dilation, **kw)
        b = nn.Conv2d(r, base.out_channels, 1, 1, **kw)
        init_factors(a.weight, b.weight, r, init)
        self.lora_A[name], self.lora_B[name] = a, b
        self._set_hparams(name, r, alpha, dropout, use_rslora)
        self._add_magnitude(name, use_dora)

    def adapted_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        for name in self.unmerged_active():
            result = result + self._delta(x, name).to(result.dtype)
        return result

    def _delta(self, x: torch.Tensor, name: str) -> torch.Tensor:
        a, b = self.lora_A[name], self.lora_B[name]
        return b(a(self._dropped(x, name).to(a.weight.dtype))) * self.scaling[name]

    def add_delta_(self, out: torch.Tensor, x: torch.Tensor, name: str) -> None:
        """Add adapter ``name``'s update for input ``x`` to ``out`` in place (mixed-adapter batches)."""
        out += self._delta(x, name).to(out.dtype)

    def _in_stored_layout(self, delta: torch.Tensor) -> torch.Tensor:
        return delta.reshape(self.base_layer.weight.shape)


def _dora_delta_weight(layer: LoraLayer, name: str) -> torch.Tensor:
    """DoRA's change to the (current) base weight, ``c (W + s B A) - W``, in the stored layout."""
    merged, _ = dora.merged_weight(layer, name)
    return merged - dora.dense_base_weight(layer.base_layer).to(merged.dtype)


def lora_kinds() -> tuple[type, ...]:
    return (*linear_kinds(), nn.Embedding, nn.Conv2d)


def wrap_with_lora(module: nn.Module, path: str) -> LoraLayer:
    """A fresh LoRA wrapper around ``module``."""
    if isinstance(module, linear_kinds()):
        return LoraLinear(module)
    if isinstance(module, nn.Embedding):
        return LoraEmbedding(module)
    if isinstance(module, nn.Conv2d):
        return LoraConv2d(module)
    raise TargetError(f"{path} is a {type(module).__name__}; LoRA wraps Linear, Conv1D, Embedding and Conv2d")
