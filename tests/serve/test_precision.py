"""The server's precision: ``auto`` takes bf16 autocast where the hardware computes bf16 natively
(CUDA, AVX512-BF16/AMX CPUs) and fp32 elsewhere, as training does; ``bf16`` and ``fp32`` force it.

Forcing bf16 on a CPU without native bf16 is slow but correct, which is what these tests use.
"""

from __future__ import annotations

import pytest
import torch
from fastapi.testclient import TestClient

import deltatune as dt
import deltatune.core.precision as precision_module
from deltatune.errors import ConfigError
from deltatune.serve import create_app
from tests.serve.conftest import NAMES, TEXTS, served_model, tiny_gpt2


def _record_output_dtypes(model: torch.nn.Module) -> list[torch.dtype]:
    """The dtype of every output of the classification head (or LM head) during later forwards."""
    head = next(m for n, m in model.named_modules() if n.endswith(("classifier", "lm_head")) and hasattr(m, "weight"))
    seen: list[torch.dtype] = []
    head.register_forward_hook(lambda m, i, out: seen.append(out.dtype))
    return seen


@pytest.mark.parametrize("native, expected", [(True, "bf16"), (False, "fp32")])
def test_auto_follows_the_cpus_bf16_support(adapter_root, tokenizer, monkeypatch, native, expected):
    monkeypatch.setattr(precision_module, "cpu_has_native_bf16", lambda: native)
    app = create_app(served_model(adapter_root, NAMES[:1]), tokenizer)
    assert app.state.engine.precision == expected


def test_an_unknown_precision_is_refused_naming_the_choices(adapter_root, tokenizer):
    with pytest.raises(ConfigError, match="precision must be one of auto, fp32, bf16, got 'fp16'"):
        create_app(served_model(adapter_root, NAMES[:1]), tokenizer, precision="fp16")


def test_bf16_classifies_a_mixed_batch_in_bf16_close_to_fp32(adapter_root, tokenizer, reference):
    model = served_model(adapter_root)
    seen = _record_output_dtypes(model)
    with TestClient(create_app(model, tokenizer, precision="bf16"), raise_server_exceptions=False) as client:
        for name in [*NAMES[:3], dt.BASE_ADAPTER]:
            r = client.post("/v1/classify", json={"adapter": name, "inputs": TEXTS[:4]})
            assert r.status_code == 200, r.text
            # measured: bf16 moved these probabilities by at most 0.0018; two adapters' answers
            # differ by at least 0.023, so a mix-up would still show
            reference.check(name, TEXTS[:4], r.json(), atol=5e-3)
    assert seen and set(seen) == {torch.bfloat16}


def test_fp32_serves_in_fp32(adapter_root, tokenizer, monkeypatch):
    monkeypatch.setattr(precision_module, "cpu_has_native_bf16", lambda: True)  # auto would take bf16
    model = served_model(adapter_root, NAMES[:1])
    seen = _record_output_dtypes(model)
    with TestClient(create_app(model, tokenizer, precision="fp32"), raise_server_exceptions=False) as client:
        assert client.post("/v1/classify", json={"adapter": "a0", "inputs": ["x"]}).status_code == 200
    assert seen and set(seen) == {torch.float32}


def test_bf16_generation_runs_in_bf16(adapter_root, tokenizer):
    model = dt.AdaptedModel(tiny_gpt2())
    model.load(str(adapter_root / "gpt" / "g0"), "g0")
    seen = _record_output_dtypes(model)
    with TestClient(create_app(model, tokenizer, precision="bf16"), raise_server_exceptions=False) as client:
        r = client.post("/v1/generate", json={"adapter": "g0", "prompt": "the quick brown fox", "max_new_tokens": 3})
    assert r.status_code == 200, r.text
    assert len(r.json()["tokens"]) == 3
    assert len(seen) == 3 and set(seen) == {torch.bfloat16}
