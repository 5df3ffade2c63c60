"""A tiny random Llama with MiniLM's tokenizer and four saved LoRA adapters that really differ,
and the library's own greedy generation for one prompt alone (``AdaptedModel.generate``)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import deltatune as dt

LLAMA_ADAPTERS = ["l0", "l1", "l2", "l3"]
#: a plain Jinja chat template, as tokenizers of chat models carry
CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}assistant:{% endif %}")


def tiny_llama() -> torch.nn.Module:
    """The same random Llama on every call; no EOS token, so greedy runs always go to max_tokens."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=30522, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=1024, bos_token_id=None, eos_token_id=None,
        pad_token_id=0)).eval()


def llama_with(root: Path, names=LLAMA_ADAPTERS) -> dt.AdaptedModel:
    model = dt.AdaptedModel(tiny_llama())
    for name in names:
        model.load(str(root / name), name)
    return model.eval()


def greedy_alone(model: dt.AdaptedModel, adapter: str, prompt: list[int], max_tokens: int) -> list[int]:
    """The reference: ``prompt`` alone through transformers' own ``generate``, greedy."""
    with torch.inference_mode():
        out = model.generate(input_ids=torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                             adapter_names=[adapter], max_new_tokens=max_tokens, do_sample=False, pad_token_id=0)
    return out[0, len(prompt):].tolist()


@pytest.fixture(scope="session")
def llama_root(tmp_path_factory) -> Path:
    """``l0`` ... ``l3`` (LoRA r=4 on q, v, o, up, random init) for :func:`tiny_llama`, and ``spare``."""
    root = tmp_path_factory.mktemp("llama-adapters")
    for i, name in enumerate([*LLAMA_ADAPTERS, "spare"]):
        base = tiny_llama()  # seeds torch itself: the adapter's own seed comes after
        torch.manual_seed(300 + i)
        model = dt.attach(base, dt.LoraConfig(r=4, alpha=8, targets=["q", "v", "o", "up"], init="random"))
        with torch.no_grad():  # large enough that every adapter changes the greedy tokens
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(torch.randn_like(p) * 0.5)
        model.save(str(root / name))
    return root


@pytest.fixture(scope="session")
def chat_tokenizer():
    tokenizer = dt.load_tokenizer("minilm")
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer
