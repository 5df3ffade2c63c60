"""The sequences being generated now, as one batch with one KV cache, stepped on the model thread.

Each step is one decode forward over every running sequence, each row through its own adapter
(``adapter_names=``), then one prefill forward for the sequences that join; they take part in
decoding from the next step. The cache is transformers' :class:`~transformers.DynamicCache`
with rows left-padded to a common length: a joining prefill is padded to the running rows'
length (or they to its), a finished row is dropped at once with ``batch_select_indices``, and
columns that have become padding in every row are cut off.

transformers' own continuous batching (``generate_batch``, paged attention) packs all sequences
into a single row of tokens; per-row adapter routing needs one row per sequence, hence this.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Callable

import torch

from deltatune.core.model import AdaptedModel
from deltatune.core.routing import BASE_ADAPTER
from deltatune.core.routing import grouping_order
from deltatune.errors import ConfigError
from deltatune.serve.errors import RequestError
from deltatune.serve.sampling import SamplingParams, TextStream, TokenChooser


@dataclass(eq=False)
class Sequence:
    """One request's generation. The event loop sets only :attr:`cancelled`; the rest is written
    on the model thread and read by the loop after each step."""

    adapter: str
    prompt: list[int]
    params: SamplingParams
    text: TextStream
    chooser: TokenChooser = field(init=False)
    tokens: list[int] = field(default_factory=list)  #: new tokens so far
    piece: str = ""  #: text released by the latest step
    finish_reason: str | None = None  #: "stop", "length" or "error"
    error: Exception | None = None
    cancelled: bool = False  #: the client went away: dropped at the next step

    def __post_init__(self) -> None:
        self.chooser = TokenChooser(self.params)

    @property
    def done(self) -> bool:
        return self.finish_reason is not None


class RunningBatch:
    """Steps all running sequences of ``model`` together. Not thread-safe: the model thread only."""

    def __init__(self, model: AdaptedModel, *, pad_id: int, eos_ids: set[int], device: torch.device,
                 autocast: Callable = torch.autocast) -> None:
        self.model = model
        self.pad_id = pad_id
        self.eos_ids = eos_ids
        self.device = device
        self._autocast = autocast
        self.rows: list[Sequence] = []
        self.cache = None  # transformers DynamicCache, rows in self.rows order
        self.mask: torch.Tensor | None = None  # [rows, cached tokens], 0 where a row is padded
        forward = inspect.signature(model.base_model.forward).parameters
        self._last_logits_only = {"logits_to_keep": 1} if "logits_to_keep" in forward else {}
        self._cache_keyword = "cache" if "cache" in forward else "past_key_values"  # renamed in transformers 5

    def step(self, joining: list[Sequence]) -> list[Sequence]:
        """Drop cancelled rows, decode one token for every running row, prefill ``joining``;
        returns the sequences that changed (new text or finished)."""
        self._drop([s for s in self.rows if s.cancelled])
        changed = self._fail_unloaded()
        try:
            if self.rows:
                changed += self._decode()
            if joining:
                changed += self._prefill(joining)
        except Exception as exc:  # a broken forward fails what it touched; the server keeps running
            changed = [*self.rows, *joining]
            for seq in changed:
                if not seq.done:
                    seq.finish_reason, seq.error = "error", exc
            self.clear()
        self._drop([s for s in self.rows if s.done])
        return changed

    def clear(self) -> None:
        """Forget every row (after a failure outside :meth:`step`)."""
        self.rows, self.cache, self.mask = [], None, None

    # --- forwards -------------------------------------------------------------------------
    def _decode(self) -> list[Sequence]:
        rows = self.rows
        ids = torch.tensor([[s.tokens[-1]] for s in rows], device=self.device)
        positions = torch.tensor([[len(s.prompt) + len(s.tokens) - 1] for s in rows], device=self.device)
        self.mask = torch.cat([self.mask, self.mask.new_ones(len(rows), 1)], dim=1)
        logits = self._forward(rows, ids, positions, self.cache)
        return self._advance(rows, logits)

    def _prefill(self, joining: list[Sequence]) -> list[Sequence]:
        length = max(len(s.prompt) for s in joining)
        ids = torch.tensor([[self.pad_id] * (length - len(s.prompt)) + s.prompt for s in joining], device=self.device)
        mask = torch.tensor([[0] * (length - len(s.prompt)) + [1] * len(s.prompt) for s in joining], device=self.device)
        positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
        cache_before, mask_before = self.cache, self.mask
        self.cache, self.mask = None, mask
        logits = self._forward(joining, ids, positions, None)
        for layer in self.cache.layers:  # padded positions hold garbage (even NaN): make them plain zeros
            pad = (mask == 0)[:, None, :, None]
            layer.keys, layer.values = layer.keys.masked_fill(pad, 0), layer.values.masked_fill(pad, 0)
        if cache_before is not None:
            self._merge(cache_before, mask_before)
        self.rows = [*self.rows, *joining]
        order = grouping_order([s.adapter for s in self.rows])
        if order is not None:  # each adapter's rows contiguous, so decode steps slice instead of gather
            self._take(order)
        return self._advance(joining, logits)

    def _forward(self, rows: list[Sequence], ids, positions, cache) -> torch.Tensor:
        with torch.inference_mode(), self._autocast():
            out = self.model(input_ids=ids, attention_mask=self.mask, position_ids=positions, use_cache=True,
                             adapter_names=[s.adapter for s in rows], **{self._cache_keyword: cache},
                             **self._last_logits_only)
        if self.cache is None:
            self.cache = getattr(out, "cache", None) or out.past_key_values
            if any(getattr(layer, "is_sliding", False) for layer in self.cache.layers):
                raise ConfigError("continuous batching needs full-attention KV caches; this model has "
                                  "sliding-window layers")
        return out.logits[:, -1].float()

    def _advance(self, rows: list[Sequence], logits: torch.Tensor) -> list[Sequence]:
        for seq, row in zip(rows, logits):
            token = seq.chooser.choose(row)
            seq.tokens.append(token)
            if token in self.eos_ids:
                seq.finish_reason = "stop"
                seq.text.tokens.append(token)  # counted, never shown
                seq.piece = seq.text.finish()
                continue
            seq.piece = seq.text.push(token)
            if seq.text.stopped:
                seq.finish_reason = "stop"
            elif len(seq.tokens) >= seq.params.max_tokens:
                seq.finish_reason = "length"
                seq.piece += seq.text.finish()
        return list(rows)

    # --- rows joining and leaving ---------------------------------------------------------
    def _merge(self, cache_before, mask_before: torch.Tensor) -> None:
        """Put the rows of ``cache_before`` (the running ones) above the new cache's rows."""
        width = max(mask_before.shape[1], self.mask.shape[1])
        for old, new in zip(cache_before.layers, self.cache.layers):
            new.keys = torch.cat([_pad_left(old.keys, width, -2), _pad_left(new.keys, width, -2)])
            new.values = torch.cat([_pad_left(old.values, width, -2), _pad_left(new.values, width, -2)])
        self.mask = torch.cat([_pad_left(mask_before, width, 1), _pad_left(self.mask, width, 1)])

    def _drop(self, leaving: list[Sequence]) -> None:
        if not leaving:
            return
        keep = [i for i, s in enumerate(self.rows) if s not in leaving]
        if not keep:
            self.clear()
            return
        self._take(torch.tensor(keep))
        first = int(self.mask.any(dim=0).nonzero()[0])  # columns before it are padding in every row left
        if first:
            for layer in self.cache.layers:
                layer.keys, layer.values = layer.keys[..., first:, :], layer.values[..., first:, :]
            self.mask = self.mask[:, first:]

    def _take(self, index: torch.Tensor) -> None:
        """Keep the rows at ``index``, in that order."""
        self.rows = [self.rows[i] for i in index.tolist()]
        index = index.to(self.device)
        self.cache.batch_select_indices(index)
        self.mask = self.mask[index]

    def _fail_unloaded(self) -> list[Sequence]:
        """Rows whose adapter was unloaded (removed or evicted) since they started end with a 404."""
        loaded = set(self.model.adapter_names) | {BASE_ADAPTER}
        gone = [s for s in self.rows if s.adapter not in loaded]
        for seq in gone:
            seq.finish_reason = "error"
            seq.error = RequestError(404, f"adapter {seq.adapter!r} was unloaded while generating")
        self._drop(gone)
        return gone


def _pad_left(tensor: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    """``tensor`` with zeros before its entries along ``dim`` up to ``width``."""
    missing = width - tensor.shape[dim]
    if missing == 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)
