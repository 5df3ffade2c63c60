"""Training on a CPU with every dropout mask drawn by :func:`deltatune.core.dropout.dropout`.

A transformers model in training mode drops out in two kinds of places: its plain
``nn.Dropout`` modules, and the attention probabilities, inside ``scaled_dot_product_attention``.
On a CPU, SDPA with dropout takes its math path and draws the probabilities' mask (batch x heads
x T x T elements: 6.3M a layer for MiniLM at batch 32 x 128) with torch's generator. Measured on
a 2-core Xeon, torch's masks were a fifth of a MiniLM training step.

:class:`CpuDropout` makes both draw their masks with :func:`~deltatune.core.dropout.dropout`:
it swaps the plain dropout modules (:func:`~deltatune.core.dropout.fast_dropout`) and, while any
scope is open, puts :func:`cpu_dropout_attention` in transformers' ``AttentionInterface`` under
the name ``"sdpa"``: transformers' own SDPA attention, with the dropout of the probabilities
written out (:func:`attention_with_dropout`). The models' configs keep their names, because model
code compares them (Falcon, asked for anything but ``"sdpa"``, takes an eager path that reads the
SDPA mask as an additive one). Calls the function does not cover (no dropout, not on a CPU in
float32, a position bias, a soft cap, a single query) go to transformers' function unchanged, so
the swap changes nothing for any other call in the process, only the random stream of covered ones.

Who uses it: :class:`deltatune.core.model.AdaptedModel` around each training-mode forward on a
CPU, and the trainer around each micro-batch's forward and backward. The forward alone is not
enough under gradient checkpointing, which runs the blocks again during the backward, outside
the forward: the model then keeps torch's dropout unless its caller (the trainer) holds the
scope across the backward too.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Iterator

import torch
from torch import nn

from deltatune.core.dropout import dropout, fast_dropout, plain_dropouts


def attention_with_dropout(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                           mask: torch.Tensor | None, causal: bool, p: float,
                           scaling: float | None) -> torch.Tensor:
    """Softmax attention with dropout ``p`` on the probabilities, as SDPA computes it on a CPU,
    with the mask drawn by :func:`deltatune.core.dropout.dropout`. ``query`` is ``(batch, heads,
    T, dim)``; ``key`` and ``value`` may have fewer heads (grouped-query attention); ``mask`` is
    boolean (True: attend) or additive, broadcast to the scores. Returns ``(batch, T, heads, dim)``.

    A masked score is set to the dtype's lowest value, not -inf (as transformers' eager attention
    does): a query that may see no key at all, which can only be padding, then averages the
    values instead of turning the softmax and every gradient through it into NaN."""
    if key.shape[1] != query.shape[1]:  # grouped-query attention: each key head serves several
        key = key.repeat_interleave(query.shape[1] // key.shape[1], dim=1)
        value = value.repeat_interleave(query.shape[1] // value.shape[1], dim=1)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    scores = torch.matmul(query, key.transpose(-1, -2)) * scale
    lowest = torch.finfo(scores.dtype).min
    if causal:
        later = torch.ones(query.shape[2], key.shape[2], dtype=torch.bool, device=query.device).triu(1)
        scores = scores.masked_fill(later, lowest)
    if mask is not None:
        scores = scores.masked_fill(~mask, lowest) if mask.dtype == torch.bool else scores + mask
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    return torch.matmul(dropout(probs, p), value).transpose(1, 2)


def cpu_dropout_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                          attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                          is_causal: bool | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """``"sdpa"`` in transformers' ``AttentionInterface`` while a scope is open: transformers' SDPA
    attention, with :func:`attention_with_dropout` where dropout is on for float32 CPU tensors.
    Arguments and the choice of causal masking are those of ``sdpa_attention_forward``."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    q_length, kv_length = query.shape[2], key.shape[2]
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    causal = q_length > 1 and attention_mask is None and causal
    covered = (dropout > 0 and query.device.type == "cpu" and query.dtype == torch.float32 and q_length > 1
               and kwargs.get("position_bias") is None and kwargs.get("softcap") is None
               and not (causal and kv_length != q_length) and not torch.jit.is_tracing())
    if not covered:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, is_causal=is_causal, **kwargs)
    out = attention_with_dropout(query, key, value, attention_mask, causal, dropout, scaling)
    return out.contiguous(), None


_lock = threading.Lock()
_open_scopes = 0
_replaced = None  # transformers' "sdpa" function while a scope is open


@contextlib.contextmanager
def _sdpa_with_cpu_dropout() -> Iterator[None]:
    """Within: ``"sdpa"`` in transformers' ``AttentionInterface`` is :func:`cpu_dropout_attention`.
    Counted, so that nested and concurrent scopes put transformers' function back once, at the
    end of the last; an "sdpa" someone else registered is left in place."""
    global _open_scopes, _replaced
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.modeling_utils import AttentionInterface

    mapping = AttentionInterface._global_mapping
    with _lock:
        if _open_scopes == 0 and mapping.get("sdpa") is sdpa_attention_forward:
            _replaced = mapping["sdpa"]
            mapping["sdpa"] = cpu_dropout_attention
        _open_scopes += 1
    try:
        yield
    finally:
        with _lock:
            _open_scopes -= 1
            if _open_scopes == 0 and _replaced is not None:
                mapping["sdpa"], _replaced = _replaced, None


class CpuDropout:
    """A model's dropout sites, found once: its plain dropout modules and the modules that can
    turn gradient checkpointing on."""

    def __init__(self, model: nn.Module) -> None:
        self.dropouts = plain_dropouts(model)
        self._checkpointing = [m for m in model.modules() if hasattr(m, "gradient_checkpointing")]

    def checkpointing(self) -> bool:
        """Whether gradient checkpointing is on (it can be switched at any time)."""
        return any(bool(m.gradient_checkpointing) for m in self._checkpointing)

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        """Within: the plain dropout modules and SDPA attention draw masks with
        :func:`deltatune.core.dropout.dropout`. Nests: an inner scope changes nothing."""
        with fast_dropout(self.dropouts), _sdpa_with_cpu_dropout():
            yield
