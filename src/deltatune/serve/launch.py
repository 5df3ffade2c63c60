"""``deltatune serve``: load the base model and the start-up adapters, then run uvicorn.

This module does not import FastAPI at import time, so ``deltatune --help`` works
without the ``serve`` extra.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from deltatune.errors import ConfigError, DeltatuneError
from deltatune.serve.settings import DEFAULTS
from deltatune.core.precision import PRECISIONS

_AUTO_CLASSES = {"seq-cls": "AutoModelForSequenceClassification", "causal-lm": "AutoModelForCausalLM"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The ``serve`` subcommand's options."""
    p.add_argument("--model", required=True, help="base model alias (minilm, smollm2) or local model folder")
    p.add_argument("--adapters", default="", metavar="NAME=DIR,...",
                   help="adapters to load at start (pinned: never evicted), e.g. sst2=runs/a/adapter,trec=runs/b/adapter")
    p.add_argument("--adapter-root", metavar="DIR",
                   help="folder that runtime loads (POST /v1/adapters) may read from; without it they are refused")
    p.add_argument("--task", choices=sorted(_AUTO_CLASSES),
                   help="seq-cls (POST /v1/classify) or causal-lm (POST /v1/generate); default: the first adapter's")
    p.add_argument("--num-labels", type=int, help="classes of a seq-cls model (default: from the first adapter's head)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    for flag, kind, what in (("--max-batch", int, "rows per model call"),
                             ("--max-wait-ms", float, "how long a batch waits to fill"),
                             ("--queue-size", int, "waiting requests before 429"),
                             ("--max-adapters", int, "adapters kept loaded, LRU"),
                             ("--max-length", int, "tokens per input, longer is truncated"),
                             ("--max-body-mb", float, "request bodies above this are answered 413; 0: no limit"),
                             ("--max-queue-ms", float, "requests queued longer are answered 503 with Retry-After; "
                                                       "0: no deadline"),
                             ("--max-running", int, "sequences generated together (continuous batching)"),
                             ("--max-prefill-tokens", int, "prompt tokens prefilled per generation step"),
                             ("--max-kv-tokens", int, "prompt + max_tokens reserved over running sequences")):
        default = getattr(DEFAULTS, flag[2:].replace("-", "_"))
        p.add_argument(flag, type=kind, default=default, help=f"{what} (default {default:g})")
    p.add_argument("--load-on-demand", action="store_true",
                   help="a generation request naming an unloaded adapter folder under --adapter-root loads it")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--precision", choices=PRECISIONS, default=DEFAULTS.precision,
                   help="auto (default): bf16 autocast on CUDA and on CPUs with native bf16, fp32 elsewhere")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])


def parse_adapters(spec: str) -> dict[str, str]:
    """``"a=dir1,b=dir2"`` -> ``{"a": "dir1", "b": "dir2"}``."""
    adapters: dict[str, str] = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        name, sep, path = item.partition("=")
        if not sep or not name.strip() or not path.strip():
            raise ConfigError(f"--adapters entry {item!r} is not NAME=DIR")
        if name.strip() in adapters:
            raise ConfigError(f"--adapters names {name.strip()!r} twice")
        adapters[name.strip()] = path.strip()
    return adapters


def adapter_facts(folder: str | os.PathLike) -> tuple[str | None, int | None]:
    """``(task_type, class count)`` of a saved adapter, read without loading its weights."""
    from deltatune.core.state import CONFIG_NAME, read_config, saved_class_count

    folder = Path(folder)
    task = labels = None
    try:
        task = read_config(folder / CONFIG_NAME).get("task_type")
        labels = saved_class_count(folder)
    except (DeltatuneError, OSError):
        pass  # loading the adapter later reports a broken folder with the core's message
    return task, labels


def build_model(model: str, adapters: dict[str, str], task: str | None = None, num_labels: int | None = None,
                device: str = "auto"):
    """``(AdaptedModel, tokenizer)``: base ``model`` with ``adapters`` loaded, in eval mode."""
    import torch

    from deltatune.core.loading import load_model, load_tokenizer
    from deltatune.core.model import AdaptedModel

    facts = {name: adapter_facts(path) for name, path in adapters.items()}
    first = next(iter(facts.values()), (None, None))
    if task is None:
        task = "causal-lm" if first[0] == "CAUSAL_LM" else "seq-cls"
    kwargs = {}
    if task == "seq-cls":
        counts = {name: n for name, (_, n) in facts.items() if n is not None}
        if len(set(counts.values())) > 1:
            raise ConfigError(f"the adapters have different class counts {counts}; one server's classification "
                              f"adapters must share the count (run one server per count)")
        labels = num_labels or next(iter(counts.values()), None)
        if labels:
            kwargs["num_labels"] = labels
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    base = load_model(model, auto_class=_AUTO_CLASSES[task], quiet=True, **kwargs)  # adapters bring heads
    adapted = AdaptedModel(base)
    for name, path in adapters.items():
        adapted.load(path, name)
    return adapted.to(device).eval(), load_tokenizer(model)


def serve(args: argparse.Namespace) -> None:
    """Run ``deltatune serve`` with parsed ``args`` until interrupted."""
    try:
        import uvicorn

        from deltatune.serve.app import create_app
    except ImportError as exc:
        raise DeltatuneError(f"deltatune serve needs the serve extra ({exc.name} is missing): "
                             f"pip install 'deltatune[serve]'") from None
    root = args.adapter_root
    if root is not None and not Path(root).is_dir():
        raise ConfigError(f"--adapter-root {root} is not a folder")
    model, tokenizer = build_model(args.model, parse_adapters(args.adapters), args.task, args.num_labels, args.device)
    app = create_app(model, tokenizer, adapter_root=root, max_batch=args.max_batch, max_wait_ms=args.max_wait_ms,
                     queue_size=args.queue_size, max_adapters=args.max_adapters, max_length=args.max_length,
                     precision=args.precision, max_body_mb=args.max_body_mb, max_queue_ms=args.max_queue_ms,
                     max_running=args.max_running,
                     max_prefill_tokens=args.max_prefill_tokens, max_kv_tokens=args.max_kv_tokens,
                     load_on_demand=args.load_on_demand)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
