"""Padding-free training: the transformer blocks compute the real tokens of a batch, not its padding.

A batch of ``B`` sequences padded to ``T`` positions reaches the first block as ``(B, T, hidden)``.
Inside a block everything but attention works token by token (projections, feed-forward, norms,
dropout), so the blocks can run on one row of the batch's ``L`` real tokens, ``(1, L, hidden)``:
a random batch of SST-2 sentences pads to about three times its real tokens. Attention runs per
sequence: sequences of similar length are gathered into small padded groups, and the outputs are
put back in place. On a CPU (float32 or float64) one autograd function computes every group of a
layer, forward and backward, with deltatune's dropout masks
(:func:`deltatune.train.packed_attention.grouped_attention`); elsewhere each group goes through
transformers' own SDPA attention. After the last block the tokens return to ``(B, T, hidden)``,
zeros at the padding, so embeddings, pooling, heads and the loss see the shapes they always see.
The gradient is the padded batch's.

The blocks receive the packed row through forward hooks, and attention goes through an
implementation registered with transformers' ``AttentionInterface``, selected only while a packed
batch runs. Whether a model computes the same outputs this way is checked, not assumed:
:meth:`Packer.verify` runs one batch both ways and compares. A model that differs (relative
position biases, positions mixed outside attention, attention that does not go through the
interface) trains on padded batches instead.
"""

from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
from torch import nn

from deltatune.core.archspec import spec_for
from deltatune.core.wrapping import submodule
from deltatune.train.batching import length_pieces
from deltatune.train.packed_attention import GroupLayout, grouped_attention

#: the name the packed attention is registered under in transformers' attention interfaces
IMPLEMENTATION = "deltatune_packed"
#: what one more attention group costs beyond the area it computes (sequences x length^2), in
#: those units: a group is a few small kernels in each block, forward and backward, about as much
#: as the attention of one sequence of 20 tokens. Measured for the CPU path on MiniLM with batches
#: of 32 SST-2 sentences: 200 to 4,000 within 5% of each other (3.1-3.3 ms a layer), 16,000 30% slower
GROUP_COST = 400
#: attention arguments the packed groups cannot reproduce
_UNSUPPORTED = ("position_bias", "softcap", "s_aux", "sinks", "attention_bias")


class PackingUnsupported(RuntimeError):
    """The model does something that packing cannot reproduce; its batches stay padded."""


_active: contextvars.ContextVar[PackedBatch | None] = contextvars.ContextVar("deltatune_packed_batch",
                                                                              default=None)


@dataclass
class _Group:
    """Sequences of similar length that attend together, padded to ``width``."""

    gather: torch.Tensor              #: (count * width,) packed positions, padding repeats a real one
    count: int
    width: int
    key_mask: torch.Tensor | None     #: (count, 1, 1, width), True at real keys; None when all are
    real: torch.Tensor | None         #: rows of the group's (count * width) that are real; None: all


class PackedBatch:
    """Where the real tokens of a padded batch are, and how attention groups its sequences."""

    def __init__(self, attention_mask: torch.Tensor, group_cost: float = GROUP_COST) -> None:
        keep = attention_mask.bool()
        self.batch, self.width = keep.shape
        self.rows = keep.reshape(-1).nonzero().squeeze(1)  # real tokens of the flattened batch
        self.total = int(self.rows.numel())
        lengths = keep.sum(1).tolist()
        self.longest = max(lengths, default=0)
        starts = [0]
        for length in lengths[:-1]:
            starts.append(starts[-1] + length)
        device = attention_mask.device
        self.groups: list[_Group] = []
        order: list[int] = []
        present = [s for s in range(self.batch) if lengths[s]]
        for seqs in length_pieces(present, lengths, group_cost, power=2) if present else []:
            width = lengths[seqs[0]]  # longest first
            gather: list[int] = []
            real: list[int] = []
            for j, s in enumerate(seqs):
                tokens = range(starts[s], starts[s] + lengths[s])
                gather += [*tokens, *[starts[s]] * (width - lengths[s])]
                real += range(j * width, j * width + lengths[s])
                order += tokens
            ragged = lengths[seqs[-1]] != width
            key_mask = None
            if ragged:
                key_mask = (torch.arange(width)[None, :] < torch.tensor([lengths[s] for s in seqs])[:, None])
                key_mask = key_mask[:, None, None, :].to(device)
            self.groups.append(_Group(torch.tensor(gather, device=device), len(seqs), width, key_mask,
                                      torch.tensor(real, device=device) if ragged else None))
        self.inverse = torch.empty(self.total, dtype=torch.long)
        self.inverse[torch.tensor(order, dtype=torch.long)] = torch.arange(self.total)
        self.inverse = self.inverse.to(device)
        self.attention_calls = 0
        self._layouts: dict[tuple, GroupLayout] = {}

    # --- the token layout -----------------------------------------------------------------
    def pack(self, tensor: torch.Tensor) -> torch.Tensor:
        """``(B or 1, T, ...)`` -> ``(1, L, ...)``: the real tokens, in order."""
        tensor = tensor.expand(self.batch, *tensor.shape[1:])
        return tensor.reshape(self.batch * self.width, *tensor.shape[2:]).index_select(0, self.rows).unsqueeze(0)

    def unpack(self, tensor: torch.Tensor) -> torch.Tensor:
        """``(1, L, ...)`` -> ``(B, T, ...)``, zeros at the padding."""
        rest = tensor.shape[2:]
        out = tensor.new_zeros(self.batch * self.width, *rest).index_copy(0, self.rows, tensor[0])
        return out.view(self.batch, self.width, *rest)

    def per_token(self, value: Any) -> Any:
        """``value`` packed when it is a tensor laid out per token (rotary tables, position ids),
        else as it is; tuples and lists element by element."""
        if isinstance(value, (tuple, list)):
            return type(value)(self.per_token(v) for v in value)
        if (isinstance(value, torch.Tensor) and value.dim() >= 2 and value.shape[1] == self.width
                and value.shape[0] in (1, self.batch)):
            return self.pack(value)
        return value

    def is_packed(self, hidden: torch.Tensor) -> bool:
        return hidden.dim() >= 2 and hidden.shape[0] == 1 and hidden.shape[1] == self.total

    def is_padded(self, hidden: torch.Tensor) -> bool:
        return hidden.dim() >= 2 and tuple(hidden.shape[:2]) == (self.batch, self.width)

    # --- attention ------------------------------------------------------------------------
    def attention(self, attend: Callable, module: nn.Module, query: torch.Tensor, key: torch.Tensor,
                  value: torch.Tensor, kwargs: dict) -> tuple[torch.Tensor, None]:
        """Each sequence's attention, ``(1, L, heads, dim)``: on a CPU in float32 or float64 by
        :func:`~deltatune.train.packed_attention.grouped_attention`, elsewhere by ``attend``
        (transformers' SDPA attention) per group of sequences."""
        self.attention_calls += 1
        causal = kwargs.pop("is_causal", None)
        causal = causal if causal is not None else getattr(module, "is_causal", True)
        p = kwargs.get("dropout") or 0.0
        if query.device.type == "cpu" and query.dtype in (torch.float32, torch.float64) and 0.0 <= p < 1.0:
            scaling = kwargs.get("scaling")
            return grouped_attention(query, key, value, self._layout(query, key, causal), p,
                                     scaling if scaling is not None else query.shape[-1] ** -0.5), None
        flat = [t[0].transpose(0, 1) for t in (query, key, value)]  # (L, heads, dim) each
        outs = []
        for g in self.groups:
            q, k, v = (t.index_select(0, g.gather).view(g.count, g.width, *t.shape[1:]).transpose(1, 2)
                       for t in flat)
            # right-padded inside the group: causal attention never reaches a padded key from a real query
            mask = None if causal else g.key_mask
            out, _ = attend(module, q, k, v, mask, is_causal=causal, **kwargs)  # (count, width, heads, dim)
            out = out.reshape(g.count * g.width, *out.shape[2:])
            outs.append(out if g.real is None else out.index_select(0, g.real))
        return torch.cat(outs).index_select(0, self.inverse).unsqueeze(0), None

    def _layout(self, query: torch.Tensor, key: torch.Tensor, causal: bool) -> GroupLayout:
        """The groups' layout for these heads, built by the first layer that asks."""
        spec = (query.shape[1], key.shape[1], bool(causal), query.dtype)
        if spec not in self._layouts:
            self._layouts[spec] = GroupLayout(self.groups, self.total, *spec).to(query.device)
        return self._layouts[spec]


def packed_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None, **kwargs) -> tuple[torch.Tensor, None]:
    """The attention implementation selected while a packed batch runs (an ``AttentionInterface``
    function). The padding mask is not used: the packed batch knows where each sequence is."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    batch = _active.get()
    if batch is None:
        raise PackingUnsupported(f"{IMPLEMENTATION} attention ran outside a packed batch")
    if query.dim() != 4 or query.shape[0] != 1 or query.shape[2] != batch.total or key.shape[2] != batch.total:
        raise PackingUnsupported(f"an attention layer got {tuple(query.shape)} queries and {tuple(key.shape)} keys "
                                 f"for {batch.total} packed tokens (cross-attention, a cache or prompt tokens)")
    for name in _UNSUPPORTED:
        if kwargs.get(name) is not None:
            raise PackingUnsupported(f"attention with {name}")
    window = kwargs.pop("sliding_window", None)
    if window is not None and batch.longest > window:
        raise PackingUnsupported(f"sliding-window attention ({window}) on sequences of up to {batch.longest} tokens")
    return batch.attention(sdpa_attention_forward, module, query, key, value, kwargs)


def _no_mask(*args, **kwargs) -> None:
    return None  # the packed attention knows the sequences: no mask needs building


def register() -> None:
    """Make :data:`IMPLEMENTATION` known to transformers (once; later calls do nothing)."""
    from transformers.masking_utils import AttentionMaskInterface
    from transformers.modeling_utils import AttentionInterface

    if IMPLEMENTATION not in AttentionInterface._global_mapping:
        AttentionInterface.register(IMPLEMENTATION, packed_attention)
        AttentionMaskInterface.register(IMPLEMENTATION, _no_mask)


def find_blocks(model: nn.Module) -> nn.ModuleList | None:
    """The model's one stack of transformer blocks, or None (no stack, or several: encoder and
    decoder, a vision tower beside a text one)."""
    spec = spec_for(model)
    stacks = {split[0] for path, _ in model.named_modules() if (split := spec.split(path))}
    if len(stacks) != 1:
        return None
    blocks = submodule(model, stacks.pop())
    return blocks if isinstance(blocks, (nn.ModuleList, nn.Sequential)) and len(blocks) else None


def _packing_hook(batch: PackedBatch) -> Callable:
    def pack_inputs(module: nn.Module, args: tuple, kwargs: dict):
        by_name = not args
        hidden, args = (kwargs.pop("hidden_states", None), args) if by_name else (args[0], args[1:])
        if not isinstance(hidden, torch.Tensor):
            raise PackingUnsupported(f"a {type(module).__name__} block got no hidden states to pack")
        if batch.is_padded(hidden):
            hidden = batch.pack(hidden)
        elif not batch.is_packed(hidden):
            raise PackingUnsupported(f"a {type(module).__name__} block got hidden states of shape "
                                     f"{tuple(hidden.shape)} for a batch of {batch.batch} x {batch.width} positions")
        args = tuple(batch.per_token(a) for a in args)
        kwargs = {k: batch.per_token(v) for k, v in kwargs.items()}
        if by_name:
            return args, {**kwargs, "hidden_states": hidden}
        return (hidden, *args), kwargs
    return pack_inputs


def _unpacking_hook(batch: PackedBatch) -> Callable:
    def unpack_output(module: nn.Module, args: tuple, output):
        first = output[0] if isinstance(output, tuple) else output
        if not isinstance(first, torch.Tensor) or not batch.is_packed(first):
            raise PackingUnsupported(f"the last {type(module).__name__} block returned "
                                     f"{type(first).__name__}, not the packed hidden states")
        return (batch.unpack(first), *output[1:]) if isinstance(output, tuple) else batch.unpack(first)
    return unpack_output


class Packer:
    """Runs a model's training batches padding-free (see the module docstring)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.blocks = find_blocks(model)
        # every config object the modules read their attention implementation from
        configs = {id(c): c for m in model.modules()
                   if hasattr(c := getattr(m, "config", None), "_attn_implementation_internal")}
        self.configs = list(configs.values())
        register()

    @property
    def usable(self) -> bool:
        """Whether there is anything to pack: one stack of blocks, a transformers config, and no
        prompt adapter adding positions to every sequence (prompt, P- and prefix tuning)."""
        prompts = getattr(self.model, "model_adapters", None)
        return self.blocks is not None and bool(self.configs) and not prompts

    @contextlib.contextmanager
    def active(self, attention_mask: torch.Tensor | None) -> Iterator[PackedBatch | None]:
        """Within: forward (and backward) calls of this batch run padding-free. A batch without
        padding runs as it is."""
        if not self.usable or attention_mask is None or attention_mask.dim() != 2 or bool(attention_mask.all()):
            yield None
            return
        batch = PackedBatch(attention_mask)
        hooks = [block.register_forward_pre_hook(_packing_hook(batch), with_kwargs=True) for block in self.blocks]
        hooks.append(self.blocks[-1].register_forward_hook(_unpacking_hook(batch)))
        saved = [(c, c._attn_implementation_internal) for c in self.configs]
        token = _active.set(batch)
        try:
            for config, _ in saved:
                config._attn_implementation_internal = IMPLEMENTATION
            yield batch
        finally:
            for config, implementation in saved:
                config._attn_implementation_internal = implementation
            _active.reset(token)
            for hook in hooks:
                hook.remove()

    def verify(self, batch: dict[str, torch.Tensor]) -> str | None:
        """None when ``batch`` (with padding) gives the same loss and outputs packed as padded, else
        what differs. Runs both in eval mode (no dropout), then restores the training mode."""
        mask = batch.get("attention_mask")
        if not self.usable:
            return ("nothing to pack: no single stack of transformer blocks, no transformers config, or a prompt "
                    "adapter that adds positions")
        if mask is None or bool(mask.all()):
            return "the batch has no padding to check with"
        training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                padded = self.model(**batch)
                try:
                    with self.active(mask) as packing:
                        packed = self.model(**batch)
                except Exception as exc:  # whatever the model does with a packed row, it cannot train so
                    return f"{type(exc).__name__}: {str(exc)[:300]}"
        finally:
            self.model.train(training)
        if packing.attention_calls == 0:
            return "its attention does not go through transformers' AttentionInterface"
        return _difference(padded, packed, mask.bool())


def _difference(padded, packed, keep: torch.Tensor) -> str | None:
    """What differs between two model outputs beyond rounding, compared where tokens are real."""
    for name in ("logits", "loss"):
        a, b = getattr(padded, name, None), getattr(packed, name, None)
        if a is None and b is None:
            continue
        if a is None or b is None or a.shape != b.shape:
            return f"{name} differs in shape ({None if a is None else tuple(a.shape)} padded, " \
                   f"{None if b is None else tuple(b.shape)} packed)"
        if a.dim() >= 2 and tuple(a.shape[:2]) == tuple(keep.shape):
            a, b = a[keep], b[keep]  # per-token outputs: the padding's are not used
        # rounding alone (other kernels for other shapes) moves fp32 outputs by ~1e-7 of their size
        tolerance = 2e-4 if a.dtype == torch.float32 else 5e-2
        a, b = a.float(), b.float()
        scale = max(1.0, float(a.abs().max()) if a.numel() else 0.0)
        gap = float((a - b).abs().max()) if a.numel() else 0.0
        if not gap <= tolerance * scale:
            return f"{name} differs by up to {gap:.3g} packed against padded"
    return None
