"""The server's settings and their defaults, in a module without FastAPI or torch, so the
command line (``deltatune serve --help``), the app, the batcher and the engine share one set."""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class ServeSettings:
    """How the server batches, bounds and guards its work."""

    adapter_root: str | os.PathLike | None = None  #: runtime loads must name a folder below it; None: no runtime loads
    admin_token: str | None = None  #: None: read DELTATUNE_ADMIN_TOKEN; unset there too: admin routes disabled
    max_batch: int = 32  #: rows (texts) per model call
    max_wait_ms: float = 5.0  #: how long the first request of a batch waits for company
    queue_size: int = 256  #: waiting requests beyond this are answered 429
    max_adapters: int = 64  #: adapters kept loaded (LRU); start-up adapters are pinned
    max_length: int = 512  #: tokens per input; longer inputs are truncated
    #: auto: bf16 autocast on CUDA and on CPUs with native bf16 (AVX512-BF16/AMX), fp32 elsewhere
    precision: str = "auto"
    max_body_mb: float = 8.0  #: larger request bodies are answered 413; 0: no limit
    #: a request still queued after this long is answered 503 with Retry-After; 0: no deadline
    max_queue_ms: float = 30_000.0
    max_running: int = 32  #: sequences generated together (continuous batching); more wait
    max_prefill_tokens: int = 2048  #: prompt tokens prefilled per step (a longer prompt goes alone)
    max_kv_tokens: int = 65536  #: prompt + max_tokens reserved over all running sequences
    load_on_demand: bool = False  #: a request naming an unloaded folder under adapter_root loads it


#: the defaults, for signatures and help texts
DEFAULTS = ServeSettings()
