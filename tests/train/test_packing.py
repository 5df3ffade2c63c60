"""Padding-free training (train/packing.py): the packed forward and backward of a padded batch
give the padded model's own outputs and gradients, on every family it accepts, and the families
it cannot reproduce are refused with the reason instead of trained wrongly."""

from __future__ import annotations

import contextlib
import warnings

import pytest
import torch

import deltatune as dt
from deltatune.train.packing import PackedBatch, Packer, find_blocks
from tests.arch_zoo import ZOO

LENGTHS = [7, 3, 5, 1, 6, 7, 2]


def padded_batch(kind: str, left: bool = False, lengths: list[int] = LENGTHS) -> dict:
    """Random tokens padded to the longest of ``lengths`` (right by default), with labels."""
    gen = torch.Generator().manual_seed(3)
    width = max(lengths)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for row, length in enumerate(lengths):
        mask[row, width - length:] = 1 if left else 0
        mask[row, :length] = 0 if left else 1
    ids = torch.randint(3, 100, mask.shape, generator=gen) * mask
    labels = torch.arange(len(lengths)) % 3 if kind == "cls" else ids.masked_fill(mask == 0, -100)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def adapted(family: str):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return dt.attach(ZOO[family].build(), dt.LoraConfig(r=4, targets=["q", "v"], init="random"))


def loss_and_grads(model, batch: dict, packer: Packer | None = None):
    model.zero_grad(set_to_none=True)
    context = packer.active(batch["attention_mask"]) if packer else contextlib.nullcontext()
    with context:
        out = model(**batch)
        out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return out, grads


def test_a_packed_batch_puts_every_real_token_back_where_it_was():
    batch = padded_batch("cls")
    packing = PackedBatch(batch["attention_mask"], group_cost=30)
    real = batch["attention_mask"].bool()
    assert (packing.total, packing.batch, packing.width) == (sum(LENGTHS), 7, 7)
    hidden = torch.randn(7, 7, 5)
    packed = packing.pack(hidden)
    assert packed.shape == (1, sum(LENGTHS), 5)
    torch.testing.assert_close(packed[0], hidden[real])  # row by row, in order
    torch.testing.assert_close(packing.unpack(packed), hidden * real[..., None])
    # a table shared by the batch (rotary cos/sin of shape (1, T, d)) is laid out per token too
    table = torch.randn(1, 7, 3)
    torch.testing.assert_close(packing.pack(table)[0], table.expand(7, 7, 3)[real])
    # the attention groups hold each sequence once, whole, padded to the group's longest
    starts = [sum(LENGTHS[:i]) for i in range(len(LENGTHS))]
    held = []
    for g in packing.groups:
        rows = g.gather.view(g.count, g.width)
        for row in rows:
            seq = starts.index(int(row[0]))
            length = LENGTHS[seq]
            assert row[:length].tolist() == list(range(starts[seq], starts[seq] + length))
            held.append(seq)
        assert g.width == LENGTHS[starts.index(int(rows[0, 0]))]
    assert sorted(held) == list(range(len(LENGTHS))) and len(packing.groups) > 1


@pytest.mark.parametrize("family", ["bert", "roberta", "distilbert", "albert", "modernbert", "llama", "qwen2",
                                    "gpt2", "phi", "mixtral"])
def test_packed_training_gives_the_padded_loss_and_gradients(family):
    model = adapted(family).eval()  # eval: no dropout, so both runs compute the same function
    kind = ZOO[family].batch_kind
    batch = padded_batch(kind)
    packer = Packer(model)
    assert packer.verify(batch) is None
    padded, reference = loss_and_grads(model, batch)
    packed, grads = loss_and_grads(model, batch, packer)
    torch.testing.assert_close(packed.loss, padded.loss, rtol=1e-5, atol=1e-6)
    real = batch["attention_mask"].bool()
    logits = (packed.logits[real], padded.logits[real]) if kind == "lm" else (packed.logits, padded.logits)
    torch.testing.assert_close(*logits, rtol=1e-5, atol=1e-5)
    assert reference and grads.keys() == reference.keys()
    for name, grad in reference.items():
        assert grad.abs().sum() > 0, name  # every LoRA factor gets a gradient, so the comparison means something
        torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-6)
    # and the model is left as it was: the next padded call is the plain one
    assert model.config._attn_implementation != "deltatune_packed"
    torch.testing.assert_close(model(**batch).loss, padded.loss)


def test_packing_repeats_the_blocks_under_gradient_checkpointing():
    model = adapted("llama")
    model.base_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()  # llama has no dropout: train mode is deterministic
    batch = padded_batch("lm")
    packer = Packer(model)
    _, reference = loss_and_grads(model, batch)
    _, grads = loss_and_grads(model, batch, packer)
    for name, grad in reference.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("family, batch_options, reason", [
    ("gpt_neo", {}, "AttentionInterface"),          # its own attention: sequences would see each other
    ("gemma2", {}, "softcap"),                      # logit soft-capping inside attention
    ("deberta-v2", {}, "RuntimeError"),             # relative positions built from the padded shape
    ("gpt2", {"left": True}, "loss differs"),       # left padding: a pad position predicts the first token
])
def test_models_packing_cannot_reproduce_are_refused_with_the_reason(family, batch_options, reason):
    model = adapted(family)
    got = Packer(model).verify(padded_batch(ZOO[family].batch_kind, **batch_options))
    assert got is not None and reason in got, got


def test_encoder_decoders_and_prompt_tokens_are_refused():
    assert find_blocks(ZOO["t5"].build()) is None  # two stacks: cross-attention sees the encoder's padding
    assert "nothing to pack" in Packer(ZOO["bart"].build()).verify(padded_batch("lm"))
    prompted = dt.attach(ZOO["bert"].build(), dt.PromptTuningConfig(num_virtual_tokens=3))
    packer = Packer(prompted)
    assert not packer.usable and packer.verify(padded_batch("cls")).startswith("nothing to pack")
    packer.model = prompted.base_model  # were the prompt let through, the blocks would refuse it
    prompted_batch = padded_batch("cls")
    with pytest.raises(Exception, match="hidden states of shape"):
        with packer.active(prompted_batch["attention_mask"]):
            prompted(**prompted_batch)
