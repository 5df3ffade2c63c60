"""Training-mode calls on a CPU draw every dropout mask with deltatune's generator
(core/attention_dropout.py): the model computes what it computes with torch's dropout, the
attention written out computes transformers' SDPA attention, models that call torch's SDPA
themselves are left as they are, and gradient checkpointing, which runs the blocks again in the
backward, sees the same masks."""

from __future__ import annotations

import warnings

import pytest
import torch
import transformers
from packaging import version

import deltatune as dt
from deltatune.core import attention_dropout, dropout as core_dropout
from deltatune.core.attention_dropout import CpuDropout, cpu_dropout_attention
from tests.arch_zoo import VOCAB

ATTENTION_P, HIDDEN_P = 0.3, 0.2
#: tiny models with attention dropout ATTENTION_P and, where the family has it, hidden dropout HIDDEN_P
FAMILIES = {
    "bert": ("BertForSequenceClassification", {"attention_probs_dropout_prob": ATTENTION_P,
                                               "hidden_dropout_prob": HIDDEN_P}),
    "gpt2": ("GPT2LMHeadModel", {"attn_pdrop": ATTENTION_P, "resid_pdrop": HIDDEN_P, "embd_pdrop": HIDDEN_P,
                                 "n_embd": 32, "n_layer": 2, "n_head": 4}),
    "llama": ("LlamaForCausalLM", {"attention_dropout": ATTENTION_P, "num_key_value_heads": 2}),
    "qwen2": ("Qwen2ForCausalLM", {"attention_dropout": ATTENTION_P, "num_key_value_heads": 2}),
    # before transformers 5.25 it calls torch's SDPA itself (no dropout there), and asked for
    # anything but "sdpa" takes an eager path that reads the SDPA mask wrongly: the scope must
    # leave it computing what it did. From 5.25 on it goes through the AttentionInterface.
    "falcon": ("FalconForCausalLM", {"attention_dropout": ATTENTION_P, "hidden_dropout": 0.0}),
}
#: attention calls that go through transformers' AttentionInterface, per forward
COVERED = {"bert": 2, "gpt2": 2, "llama": 2, "qwen2": 2,
           "falcon": 2 if version.parse(transformers.__version__) >= version.parse("5.25") else 0}


def sdpa_function():
    from transformers.modeling_utils import AttentionInterface
    return AttentionInterface._global_mapping["sdpa"]


def tiny(family: str) -> torch.nn.Module:
    cls, overrides = FAMILIES[family]
    config = transformers.AutoConfig.for_model(
        family, vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
        max_position_embeddings=64, pad_token_id=0, **overrides)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return getattr(transformers, cls)(config)


def right_padded(lengths=(7, 4, 6)) -> dict:
    gen = torch.Generator().manual_seed(2)
    mask = (torch.arange(max(lengths))[None] < torch.tensor(lengths)[:, None]).long()
    ids = torch.randint(3, VOCAB, mask.shape, generator=gen) * mask
    return {"input_ids": ids, "attention_mask": mask}


@pytest.fixture
def no_drop(monkeypatch):
    """Every mask deltatune draws keeps everything; the probabilities asked for are recorded."""
    asked: list[float] = []

    def keep_all(x, p, training=True):
        asked.append(round(p, 6))
        return x
    monkeypatch.setattr(core_dropout, "dropout", keep_all)
    monkeypatch.setattr(attention_dropout, "dropout", keep_all)
    return asked


@pytest.mark.parametrize("family", FAMILIES)
def test_the_scope_routes_every_dropout_through_deltatune_and_computes_the_models_output(family, no_drop):
    model = tiny(family)
    batch = right_padded()
    reference = model.eval()(**batch).logits
    mask = batch["attention_mask"].bool()
    model.train()
    with CpuDropout(model).active():
        assert sdpa_function() is cpu_dropout_attention
        got = model(**batch).logits
    assert sdpa_function() is not cpu_dropout_attention and model.config._attn_implementation == "sdpa"
    assert all("forward" not in vars(m) for m in model.modules())
    # with every mask keeping everything, training mode is the model's eval-mode output (the rows of
    # a classifier; every real position of a language model)
    torch.testing.assert_close(got if got.dim() == 2 else got[mask], reference if got.dim() == 2 else reference[mask],
                               rtol=1e-5, atol=1e-5)
    assert no_drop.count(ATTENTION_P) == COVERED[family]  # one attention call a layer
    hidden = sum(type(m) is torch.nn.Dropout and m.p == HIDDEN_P for m in model.modules())
    assert no_drop.count(HIDDEN_P) == hidden


def test_gradients_through_written_out_attention_are_the_models_own(no_drop):
    model = tiny("llama")
    batch = {**right_padded(), "labels": right_padded()["input_ids"].masked_fill(right_padded()["attention_mask"] == 0,
                                                                                -100)}
    model.eval()(**batch).loss.backward()
    reference = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.train()
    with CpuDropout(model).active():
        model(**batch).loss.backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, reference[name], rtol=1e-4, atol=1e-6, msg=name)


def _loss_and_grads(model, batch: dict, scope=None) -> dict:
    model.zero_grad(set_to_none=True)
    torch.manual_seed(5)
    if scope is None:
        model(**batch).loss.backward()
    else:
        with scope.active():  # the backward too, as the trainer holds it
            model(**batch).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _lm_batch() -> dict:
    batch = right_padded()
    return {**batch, "labels": batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)}


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_a_scope_held_across_the_backward_gives_checkpointed_blocks_the_same_masks(family):
    model = tiny(family).train()
    batch = _lm_batch()
    scope = CpuDropout(model)
    plain = _loss_and_grads(model, batch, scope)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert scope.checkpointing()
    checkpointed = _loss_and_grads(model, batch, scope)
    for name, grad in plain.items():
        torch.testing.assert_close(checkpointed[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def adapted(family: str) -> dt.AdaptedModel:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return dt.attach(tiny(family), dt.LoraConfig(r=4, targets=["q", "v"], init="random"))


def test_an_adapted_model_draws_its_training_masks_with_deltatune(no_drop):
    model = adapted("bert")
    batch = right_padded()
    model.eval()(**batch)
    assert no_drop == []  # evaluation: no dropout at all
    model.train()(**batch)
    assert no_drop.count(ATTENTION_P) == 2 and no_drop.count(HIDDEN_P) > 0
    assert sdpa_function() is not cpu_dropout_attention
    assert all("forward" not in vars(m) for m in model.modules())
    no_drop.clear()
    model.cpu_dropout = False  # torch's own masks
    model(**batch)
    assert no_drop == []


def test_an_adapted_model_under_gradient_checkpointing_keeps_torchs_masks():
    """Checkpointed blocks run again in the backward, outside the forward's scope: the model keeps
    torch's dropout there, so both runs of a block draw the same masks."""
    model = adapted("gpt2").train()
    batch = _lm_batch()
    model.cpu_dropout = False
    reference = _loss_and_grads(model, batch)
    model.cpu_dropout = True
    model.base_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    checkpointed = _loss_and_grads(model, batch)
    for name, grad in reference.items():
        torch.testing.assert_close(checkpointed[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_scopes_nest_and_put_transformers_function_back_once():
    model = tiny("bert").train()
    original = sdpa_function()
    outer, inner = CpuDropout(model), CpuDropout(model)
    with outer.active():
        with inner.active():
            assert sdpa_function() is cpu_dropout_attention
        assert sdpa_function() is cpu_dropout_attention
        assert all("forward" in vars(m) for m in outer.dropouts)
    assert sdpa_function() is original
    assert all("forward" not in vars(m) for m in outer.dropouts)


def test_an_sdpa_function_someone_else_registered_is_left_in_place(monkeypatch):
    from transformers.modeling_utils import AttentionInterface

    def custom(*args, **kwargs):
        raise AssertionError("not called here")
    monkeypatch.setitem(AttentionInterface._global_mapping, "sdpa", custom)
    with CpuDropout(tiny("bert")).active():
        assert sdpa_function() is custom
    assert sdpa_function() is custom
