"""The model side of the server: tokenize, run one mixed-adapter forward, split the answers.

Every method except the read-only views (``check_adapter``, ``describe``) runs on the batcher's model
thread, one at a time, so the model is never used by two threads and never changes during a
forward. The event loop reads only :attr:`Engine.loaded`, :attr:`Engine.pinned` and
:attr:`Engine.evicted`, frozensets replaced whole after each change, and the cache's counts.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from deltatune.compose import AdapterCache
from deltatune.core.archspec import task_type_of
from deltatune.core.model import AdaptedModel
from deltatune.core.routing import BASE_ADAPTER
from deltatune.errors import ConfigError, DeltatuneError
from deltatune.serve.errors import RequestError
from deltatune.serve.settings import DEFAULTS
from deltatune.core.precision import autocast
from deltatune.core.precision import resolve as resolve_precision


CLASSIFY, GENERATE = "classify", "generate"
_KINDS = {"SEQ_CLS": CLASSIFY, "CAUSAL_LM": GENERATE}


class Engine:
    """Runs classify batches, generation and adapter loads on one :class:`AdaptedModel`.

    ``pinned`` adapters (those given at start-up) are never evicted by the LRU cache, which
    keeps at most ``max_adapters`` adapters loaded.
    """

    def __init__(self, model: AdaptedModel, tokenizer, *, max_adapters: int = DEFAULTS.max_adapters,
                 max_length: int = DEFAULTS.max_length, precision: str = DEFAULTS.precision) -> None:
        kind = _KINDS.get(task_type_of(model.base_model) or "")
        if kind is None:
            raise ConfigError(f"the server serves sequence classifiers and causal LMs, "
                              f"not {type(model.base_model).__name__}")
        self.kind = kind  #: CLASSIFY or GENERATE, fixed for the engine's life
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.device = next(model.parameters()).device
        self.precision = resolve_precision(precision, self.device)  #: "fp32" or "bf16", what forwards run in
        self._autocast = autocast(self.precision, self.device)
        pinned = tuple(model.adapter_names)
        model.check_mixable(pinned)  # every request batch mixes adapters
        self.cache = AdapterCache(model, max(max_adapters, len(pinned), 1), pinned=pinned)
        self.loaded: frozenset[str] = frozenset()
        self.pinned: frozenset[str] = frozenset()
        self.evicted: frozenset[str] = frozenset()  # the cache's recent evictions, for clearer 404s
        self.label_names = label_names(model.base_model)  #: class names from id2label, or None
        self._refresh()
        if kind == GENERATE and tokenizer.pad_token_id is None and tokenizer.eos_token_id is None:
            raise ConfigError("the tokenizer has neither a pad nor an eos token")

    # --- reads (safe from the event loop) -------------------------------------------------
    def check_adapter(self, name: str) -> None:
        """Raise a 404 unless ``name`` is loaded or ``"__base__"``."""
        if name == BASE_ADAPTER or name in self.loaded:
            return
        why = " (it was evicted to make room for others; load it again)" if name in self.evicted else ""
        raise RequestError(404, f"unknown adapter {name!r}{why}; loaded: {sorted(self.loaded) or 'none'} "
                                f"(or {BASE_ADAPTER!r} for the base model)")

    def describe(self) -> list[dict]:
        """The loaded adapters by name; pinned ones are never evicted."""
        loaded, pinned = self.loaded, self.pinned
        return [{"name": n, "pinned": n in pinned} for n in sorted(loaded)]

    # --- classification (model thread) ---------------------------------------------------
    def classify(self, requests: list[tuple[str, list[str]]]) -> list:
        """One result per ``(adapter, texts)`` request: a list of ``{"label", "probabilities"}``
        per text, or the exception that request met. All rows go through one forward. For a
        :data:`CLASSIFY` engine only: the route checks :attr:`kind` before queueing."""
        results: list = [None] * len(requests)
        live = []
        for i, (name, _) in enumerate(requests):
            try:
                self.check_adapter(name)  # it may have been removed while the request waited
                live.append(i)
            except RequestError as exc:
                results[i] = exc
        # grouped by adapter, each adapter's rows form one contiguous slice of the batch
        live.sort(key=lambda i: requests[i][0])
        try:
            self._classify_into(results, requests, live)
        except Exception:
            if len(live) < 2:
                raise
            # something in the batch broke the forward: run each request alone so only it fails
            for i in live:
                try:
                    self._classify_into(results, requests, [i])
                except Exception as exc:
                    results[i] = exc
        for name in {requests[i][0] for i in live} - {BASE_ADAPTER}:
            if name in self.cache:
                self.cache.touch(name)
        return results

    def _classify_into(self, results: list, requests: list[tuple[str, list[str]]], which: list[int]) -> None:
        if not which:
            return
        names = [requests[i][0] for i in which for _ in requests[i][1]]
        texts = [t for i in which for t in requests[i][1]]
        enc = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        enc = {k: v.to(self.device) for k, v in enc.items()}
        with torch.inference_mode(), self._autocast():
            logits = self.model(**enc, adapter_names=names).logits
        probs = torch.softmax(logits.float(), dim=-1).cpu()
        labels = probs.argmax(dim=-1).tolist()
        probs = probs.tolist()
        start = 0
        for i in which:
            end = start + len(requests[i][1])
            results[i] = [{"label": labels[r], "label_name": self._name_of(labels[r]), "probabilities": probs[r]}
                          for r in range(start, end)]
            start = end

    def _name_of(self, label: int) -> str | None:
        names = self.label_names
        return names[label] if names is not None and label < len(names) else None

    # --- generation (model thread) -------------------------------------------------------
    def generate(self, name: str, prompt: str, max_new_tokens: int) -> dict:
        """Greedy continuation of ``prompt`` with adapter ``name``: its text and token ids. For a
        :data:`GENERATE` engine only: the route checks :attr:`kind` before queueing."""
        self.check_adapter(name)
        enc = self.tokenizer([prompt], truncation=True, max_length=self.max_length, return_tensors="pt",
                             return_token_type_ids=False)
        enc = {k: v.to(self.device) for k, v in enc.items()}
        pad = self.tokenizer.pad_token_id
        with torch.inference_mode(), self._autocast():
            out = self.model.generate(**enc, adapter_names=[name], max_new_tokens=max_new_tokens, do_sample=False,
                                      pad_token_id=self.tokenizer.eos_token_id if pad is None else pad)
        new = out[0, enc["input_ids"].shape[1]:].tolist()
        if name != BASE_ADAPTER:
            self.cache.touch(name)
        return {"text": self.tokenizer.decode(new, skip_special_tokens=True), "tokens": new}

    # --- adapters (model thread) ---------------------------------------------------------
    def load(self, name: str, directory: Path) -> list[str]:
        """Load the adapter folder ``directory`` as ``name``; returns the adapters evicted."""
        if name in self.cache:
            raise RequestError(409, f"adapter {name!r} is loaded already; DELETE it first to replace it")
        try:
            # refused before anything is evicted for it: adapters that cannot share a mixed batch
            evicted = self.cache.load(name, directory, check=lambda n: self.model.check_mixable([n]))
        except DeltatuneError as exc:  # the core's own message: foreign base model, broken files ...
            raise RequestError(400, f"cannot load adapter {name!r}: {exc}") from None
        finally:
            self._refresh()
        return evicted

    def remove(self, name: str) -> None:
        """Unload adapter ``name``."""
        if name not in self.cache:
            raise RequestError(404, f"adapter {name!r} is not loaded; loaded: {sorted(self.loaded) or 'none'}")
        self.cache.remove(name)
        self._refresh()

    def _refresh(self) -> None:
        self.loaded = frozenset(self.cache.names())
        self.pinned = frozenset(self.cache.pinned)
        self.evicted = frozenset(self.cache.evicted())


def label_names(model: nn.Module) -> list[str] | None:
    """The class names in ``model.config.id2label`` (kept there by training and ``deltatune
    merge``), or None when it holds only transformers' placeholders (``LABEL_0`` ...)."""
    id2label = getattr(getattr(model, "config", None), "id2label", None) or {}
    try:
        names = [str(id2label[i]) for i in range(len(id2label))]
    except KeyError:  # not the classes 0..n-1: not something to answer with
        return None
    if not names or names == [f"LABEL_{i}" for i in range(len(names))]:
        return None
    return names
