"""Fixtures of the training tests: tiny random models saved as model folders (with MiniLM's
tokenizer, vocab 30522), small data files, and a recipe builder.

Tests run torch on one thread: on a shared two-core machine that is faster and steadier.
"""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

import pytest
import torch

import deltatune as dt

ROOT = Path(__file__).resolve().parents[2]
SHARED_DATA = ROOT.parent / "shared" / "data"

torch.set_num_threads(1)

_POSITIVE = "good great fine lovely superb charming".split()
_NEGATIVE = "bad awful dull boring poor weak".split()
_FILLER = "the a film movie story plot acting scene was is very quite rather and but it this".split()


def sentiment_rows(n: int, seed: int) -> list[dict]:
    """Synthetic sentences whose label is the sentiment word they contain (learnable fast)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        label = rng.randint(0, 1)
        words = rng.sample(_FILLER, rng.randint(2, 9))
        words.insert(rng.randint(0, len(words)), rng.choice(_POSITIVE if label else _NEGATIVE))
        rows.append({"sentence": " ".join(words), "label": label})
    return rows


def write_tsv(path: Path, rows: list[dict]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]), delimiter="\t")
        writer.writeheader()
        writer.writerows(rows)
    return path


def _tokenizer_into(folder: Path, chat_template: str | None = None) -> None:
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(dt.resolve_model("minilm").path)
    if chat_template:
        tok.chat_template = chat_template
    tok.save_pretrained(str(folder))


def _save(model, folder: Path, chat_template: str | None = None) -> str:
    model.save_pretrained(str(folder))
    _tokenizer_into(folder, chat_template)
    return str(folder)


@pytest.fixture(scope="session")
def toy_models(tmp_path_factory) -> dict[str, str]:
    """Model folders: ``bert`` (dropout 0.1), ``bert-nodrop``, ``gpt2``, ``llama-chat`` (a chat
    template), ``t5``. All hidden size 32, two blocks, vocab 30522."""
    from transformers import (BertConfig, BertForSequenceClassification, GPT2Config, GPT2LMHeadModel,
                              LlamaConfig, LlamaForCausalLM, T5Config, T5ForConditionalGeneration)
    root = tmp_path_factory.mktemp("toy_models")
    torch.manual_seed(0)
    bert = dict(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                intermediate_size=48, max_position_embeddings=128)
    out = {
        "bert": _save(BertForSequenceClassification(BertConfig(**bert)), root / "bert"),
        "bert-nodrop": _save(BertForSequenceClassification(BertConfig(
            **bert, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)), root / "bert-nodrop"),
        "gpt2": _save(GPT2LMHeadModel(GPT2Config(vocab_size=30522, n_embd=32, n_layer=2, n_head=4, n_positions=128)),
                      root / "gpt2"),
        "llama-chat": _save(LlamaForCausalLM(LlamaConfig(
            vocab_size=30522, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0, bos_token_id=101, eos_token_id=102)),
            root / "llama-chat",
            chat_template="{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }} [SEP] {% endfor %}"
                          "{% if add_generation_prompt %}<assistant> {% endif %}"),
        "t5": _save(T5ForConditionalGeneration(T5Config(
            vocab_size=30522, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_decoder_layers=2, num_heads=4,
            decoder_start_token_id=0, pad_token_id=0, eos_token_id=102)), root / "t5"),
    }
    return out


@pytest.fixture(scope="session")
def sentiment_files(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("sentiment")
    return {"train": str(write_tsv(root / "train.tsv", sentiment_rows(192, seed=1))),
            "eval": str(write_tsv(root / "dev.tsv", sentiment_rows(64, seed=2)))}


@pytest.fixture
def recipe(toy_models, sentiment_files, tmp_path):
    """A recipe dict for a short LoRA run of the toy BERT on the synthetic sentiment data;
    keyword arguments override sections (``train={...}`` updates the train section, ``method``
    replaces the method)."""
    def make(model: str = "bert", **changes) -> dict:
        data = {
            "model": toy_models[model],
            "task": "seq-cls",
            "data": {"train": sentiment_files["train"], "eval": sentiment_files["eval"], "text": "sentence",
                     "label": "label", "max_length": 32},
            "method": {"type": "lora", "r": 4, "alpha": 8, "targets": ["q", "v"]},
            "train": {"epochs": 1, "batch_size": 16, "lr": 5.0e-3, "eval_every": 4, "log_every": 2, "seed": 0,
                      "threads": 1},
            "output_dir": str(tmp_path / "run"),
        }
        for key, value in changes.items():  # sections are updated, except method (replaced)
            merge = key in ("data", "train") and isinstance(value, dict)
            data[key] = {**data[key], **value} if merge else value
        return data
    return make


def read_json(path) -> dict:
    return json.loads(Path(path).read_text())
