"""A few contract checks on the real embedded model: all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384)
with a fresh 2-label classification head."""

from __future__ import annotations

import copy

import pytest
import torch

import deltatune as dt
from tests.toy_models import assert_differs, assert_same, is_head_copy, logits, randomize

pytestmark = pytest.mark.usefixtures("one_thread")

LAYERS, HIDDEN, R, LABELS = 6, 384, 8, 2
#: q and v in every layer, each with A [8, 384] and B [384, 8]
LORA_PARAMS = LAYERS * 2 * (R * HIDDEN + HIDDEN * R)
HEAD_PARAMS = HIDDEN * LABELS + LABELS  # the trained copy of the classifier


@pytest.fixture(scope="module")
def minilm():
    torch.manual_seed(0)  # the classification head is newly initialised
    return dt.load_model("minilm", num_labels=LABELS).eval()


@pytest.fixture(scope="module")
def batch():
    tokenizer = dt.load_tokenizer("minilm")
    texts = ["a gripping, beautifully acted film", "dull, slow and far too long", "not bad at all"]
    return dict(tokenizer(texts, padding=True, return_tensors="pt"))


@pytest.fixture
def adapted(minilm):
    model = dt.attach(copy.deepcopy(minilm), dt.LoraConfig(r=R, alpha=16, init="random", targets=["q", "v"]))
    return randomize(model, only=is_head_copy, scale=0.05).eval()


def test_trainable_count_is_the_hand_computed_one(minilm, adapted):
    assert LORA_PARAMS == 73_728
    base_total = sum(p.numel() for p in minilm.parameters())
    assert adapted.parameter_counts() == (LORA_PARAMS + HEAD_PARAMS, base_total + LORA_PARAMS + HEAD_PARAMS)
    assert f"trainable {LORA_PARAMS + HEAD_PARAMS:,} of" in adapted.report()


def test_save_and_load_give_identical_logits(minilm, adapted, batch, tmp_path):
    expected = logits(adapted, batch)
    assert_differs(expected, logits(minilm, batch))
    adapted.save(tmp_path)
    loaded = dt.load(copy.deepcopy(minilm), tmp_path).eval()
    assert_same(logits(loaded, batch), expected)


def test_peft_loads_our_folder_with_identical_logits(minilm, adapted, batch, tmp_path):
    import peft
    expected = logits(adapted, batch)
    adapted.save(tmp_path)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(minilm), tmp_path).eval()
    assert_same(logits(theirs, batch), expected)
