"""Fixtures of the server tests: a tiny random BERT classifier and GPT-2 with MiniLM's tokenizer,
eight saved LoRA adapters that really differ, the library's own answers for them, and a real
uvicorn server on loopback.

The reference answers come from a separate model instance: each text run alone, with
``model.use(name)`` (or ``disabled()`` for ``"__base__"``), no batching, no server.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import torch

import deltatune as dt

torch.set_num_threads(1)  # a shared two-core machine: one thread is faster and steadier for tiny models

NAMES = [f"a{i}" for i in range(8)]
NUM_LABELS = 3
TEXTS = [
    "a great movie", "the plot was dull", "charming and lovely", "bad acting, worse script",
    "it is fine", "an utterly boring film that goes on and on", "superb", "weak but watchable",
    "I would see it again tomorrow", "no", "the best film of the year, by far", "rather poor",
]


def tiny_bert(hidden: int = 32) -> torch.nn.Module:
    """The same random BERT classifier on every call (fixed seed), vocabulary of MiniLM's tokenizer."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    return BertForSequenceClassification(BertConfig(
        vocab_size=30522, hidden_size=hidden, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=128, num_labels=NUM_LABELS)).eval()


def tiny_gpt2() -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=30522, n_embd=32, n_layer=2, n_head=4, n_positions=128,
                                      bos_token_id=101, eos_token_id=102, pad_token_id=0)).eval()


def save_lora(base: torch.nn.Module, folder: Path, seed: int, targets=("q", "v")) -> None:
    """A random LoRA adapter (and, for classifiers, a moved head copy) saved to ``folder``."""
    torch.manual_seed(seed)
    model = dt.attach(base, dt.LoraConfig(r=4, alpha=8, targets=list(targets), init="random"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad and "classifier" in name:
                p.add_(torch.randn_like(p) * 0.5)
    model.save(str(folder))


def served_model(root: Path, names=NAMES) -> dt.AdaptedModel:
    """A fresh tiny BERT with ``names`` loaded from ``root``, as the server would build it."""
    model = dt.AdaptedModel(tiny_bert())
    for name in names:
        model.load(str(root / name), name)
    return model.eval()


@pytest.fixture(scope="session")
def tokenizer():
    return dt.load_tokenizer("minilm")


@pytest.fixture(scope="session")
def adapter_root(tmp_path_factory) -> Path:
    """``a0`` ... ``a7`` for the tiny BERT, ``foreign`` made for a wider BERT, ``gpt/g0``, ``gpt/g1``."""
    root = tmp_path_factory.mktemp("adapters")
    for i, name in enumerate(NAMES):
        save_lora(tiny_bert(), root / name, seed=100 + i)
    save_lora(tiny_bert(hidden=48), root / "foreign", seed=99)
    for i in range(2):
        save_lora(tiny_gpt2(), root / "gpt" / f"g{i}", seed=200 + i, targets=("q", "v", "o"))
    return root


class Reference:
    """The library's own classifier outputs: one text at a time through its adapter."""

    def __init__(self, root: Path, tokenizer) -> None:
        self.model = served_model(root)
        self.tokenizer = tokenizer
        self._memo: dict[tuple[str, str], list[float]] = {}

    def probabilities(self, adapter: str, text: str) -> list[float]:
        key = (adapter, text)
        if key not in self._memo:
            enc = self.tokenizer([text], return_tensors="pt")
            with torch.no_grad():
                if adapter == dt.BASE_ADAPTER:
                    with self.model.disabled():
                        logits = self.model(**enc).logits
                else:
                    self.model.use(adapter)
                    logits = self.model(**enc).logits
            self._memo[key] = torch.softmax(logits, dim=-1)[0].tolist()
        return self._memo[key]

    def check(self, adapter: str, texts: list[str], body: dict, atol: float = 1e-5) -> None:
        """Assert that a ``/v1/classify`` answer is the reference's, text by text."""
        assert body["adapter"] == adapter
        assert len(body["outputs"]) == len(texts)
        for text, out in zip(texts, body["outputs"]):
            expected = self.probabilities(adapter, text)
            assert out["probabilities"] == pytest.approx(expected, abs=atol), (adapter, text)
            assert out["label"] == max(range(len(expected)), key=expected.__getitem__), (adapter, text)


@pytest.fixture(scope="session")
def reference(adapter_root, tokenizer) -> Reference:
    ref = Reference(adapter_root, tokenizer)
    distinct = {tuple(round(x, 4) for x in ref.probabilities(n, TEXTS[0])) for n in [*NAMES, dt.BASE_ADAPTER]}
    assert len(distinct) == len(NAMES) + 1  # every adapter answers differently: a mix-up would show
    return ref


# --- running an app ---------------------------------------------------------------------------

@asynccontextmanager
async def asgi_client(app):
    """An httpx client talking to ``app`` in-process, with the app's lifespan (batcher) running."""
    import httpx

    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver", timeout=60) as client:
            yield client


def run(coro):
    return asyncio.run(coro)


class LiveServer:
    """``app`` served by uvicorn on 127.0.0.1 (a free port) in a background thread."""

    def __init__(self, app) -> None:
        import uvicorn

        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        # keep-alive well above any pause of a busy test machine: uvicorn's 5 s default closes an
        # idle pooled connection just as a client reuses it (httpx.ReadError), a client-side race
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on", timeout_keep_alive=120))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> "LiveServer":
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=60)
        self.sock.close()
