"""Generation as the routes see it: text or chat messages in, a running :class:`Generation` out,
with adapters loaded on demand and metrics kept.

It ties the pieces together: the engine's model and tokenizer, a :class:`RunningBatch` for the
model thread, the :class:`Scheduler` that steps it, and :class:`GenerationMetrics`.
"""

from __future__ import annotations

import re
from pathlib import Path

from deltatune.core.routing import BASE_ADAPTER
from deltatune.serve.batcher import Batcher
from deltatune.serve.engine import Engine
from deltatune.serve.errors import RequestError
from deltatune.serve.generation_metrics import GenerationMetrics
from deltatune.serve.running_batch import RunningBatch, Sequence
from deltatune.serve.sampling import SamplingParams, TextStream
from deltatune.serve.scheduler import Generation, Scheduler
from deltatune.serve.schemas import NAME_PATTERN
from deltatune.serve.security import resolve_adapter_path
from deltatune.serve.settings import ServeSettings


def load_from_root(engine: Engine, root: Path | None, name: str, relative: str) -> list[str]:
    """Load the folder ``relative`` below ``root`` as ``name`` (model thread); returns the evicted
    adapters. The path is resolved right before loading, so the check and the read are adjacent."""
    folder = resolve_adapter_path(root, relative)
    try:
        return engine.load(name, folder)
    except RequestError as exc:  # the core names files by absolute path: keep the root private
        raise RequestError(exc.status, exc.detail.replace(str(root), "<adapter-root>")) from None


class GenerationService:
    """Continuous-batching generation for one :data:`GENERATE` engine."""

    def __init__(self, engine: Engine, batcher: Batcher, settings: ServeSettings, root: Path | None) -> None:
        self.engine = engine
        self.batcher = batcher
        self.settings = settings
        self.root = root
        tokenizer = engine.tokenizer
        self.tokenizer = tokenizer
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.batch = RunningBatch(engine.model, pad_id=pad, eos_ids=_eos_ids(engine.model, tokenizer),
                                  device=engine.device, autocast=engine._autocast)
        self.metrics = GenerationMetrics()
        self.scheduler = Scheduler(self.batch, batcher, max_running=settings.max_running,
                                   max_prefill_tokens=settings.max_prefill_tokens,
                                   max_kv_tokens=settings.max_kv_tokens, queue_size=settings.queue_size,
                                   max_queue_ms=settings.max_queue_ms,
                                   on_step=self.metrics.observe_step, before_step=self._touch)
        config = engine.model.base_model.config
        self.context = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)

    async def start(self) -> None:
        await self.scheduler.start()

    async def stop(self) -> None:
        await self.scheduler.stop()

    # --- prompts ----------------------------------------------------------------------------
    def encode(self, prompt: str) -> list[int]:
        return self.tokenizer(prompt, return_token_type_ids=False)["input_ids"]

    def encode_chat(self, messages: list[dict]) -> list[int]:
        """The chat template applied to ``messages``, ready for the assistant's turn."""
        if not getattr(self.tokenizer, "chat_template", None):
            raise RequestError(400, "this model's tokenizer has no chat template; use /v1/completions")
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return self.tokenizer(text, add_special_tokens=False, return_token_type_ids=False)["input_ids"]

    # --- running ----------------------------------------------------------------------------
    async def ensure_adapter(self, name: str) -> None:
        """Return once ``name`` is loaded, loading it from the adapter root first when on-demand
        loading is on (between two steps: other requests keep going); else a 404."""
        engine = self.engine
        if name == BASE_ADAPTER or name in engine.loaded:
            return
        if not (self.settings.load_on_demand and self.root is not None and re.fullmatch(NAME_PATTERN, name)):
            engine.check_adapter(name)  # raises the 404
        root = self.root

        def load() -> None:
            if name not in engine.cache:  # another request may have loaded it meanwhile
                load_from_root(engine, root, name, name)

        await self.batcher.call(load, bounded=False)

    def submit(self, adapter: str, prompt: list[int], params: SamplingParams) -> Generation:
        """Queue a generation of ``prompt`` (token ids) with ``adapter``."""
        limit = self.settings.max_length
        if len(prompt) > limit:
            raise RequestError(400, f"the prompt is {len(prompt)} tokens; this server takes at most {limit} "
                                    f"(--max-length)")
        if self.context and len(prompt) + params.max_tokens > self.context:
            raise RequestError(400, f"the prompt ({len(prompt)} tokens) plus max_tokens ({params.max_tokens}) "
                                    f"exceeds the model's context of {self.context} tokens")
        return self.scheduler.submit(Sequence(adapter, list(prompt), params, TextStream(self.tokenizer, params.stop)))

    def _touch(self, adapters: list[str]) -> None:
        """Running adapters count as just used, so an on-demand load evicts an idle one first."""
        for name in set(adapters) - {BASE_ADAPTER}:
            if name in self.engine.cache:
                self.engine.cache.touch(name)


def _eos_ids(model, tokenizer) -> set[int]:
    """The tokens that end a sequence: the tokenizer's EOS and the model's generation config's."""
    ids = {tokenizer.eos_token_id}
    config_eos = getattr(getattr(model.base_model, "generation_config", None), "eos_token_id", None)
    ids |= set(config_eos) if isinstance(config_eos, (list, tuple)) else {config_eos}
    return {i for i in ids if i is not None}
