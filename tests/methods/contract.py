"""The method contract, written once for every method: tiny random models and the checks that
every adapter must pass against the base model's own outputs.

A method's test module parametrizes over :data:`TOYS` and calls the ``check_*`` functions with a
config factory; method-specific checks (formulas, peft parity) live in that module.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable

import pytest
import torch
from torch import nn

import deltatune as dt

VOCAB = 96


@dataclass(frozen=True)
class Toy:
    """A tiny random transformers model and an input batch for it."""

    name: str
    build: Callable[[], nn.Module]
    inputs: Callable[[], dict]

    def model(self) -> nn.Module:
        torch.manual_seed(0)
        return self.build().eval()


def _ids(batch: int = 2, length: int = 7, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def _bert() -> nn.Module:
    from transformers import BertConfig, BertForSequenceClassification
    return BertForSequenceClassification(BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=64, num_labels=3))


def _gpt2() -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel
    return GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=4, n_head=4, n_positions=64,
                                      bos_token_id=1, eos_token_id=2))


def _llama() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM
    return LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                        bos_token_id=1, eos_token_id=2, pad_token_id=0))


def _t5() -> nn.Module:
    from transformers import T5Config, T5ForConditionalGeneration
    return T5ForConditionalGeneration(T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2,
                                               num_decoder_layers=2, num_heads=4, decoder_start_token_id=0,
                                               pad_token_id=0, eos_token_id=1))


def _cls_inputs() -> dict:
    return {"input_ids": _ids(), "attention_mask": torch.ones(2, 7, dtype=torch.long), "labels": torch.tensor([0, 2])}


def _lm_inputs() -> dict:
    ids = _ids()
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def _s2s_inputs() -> dict:
    labels = _ids(2, 5, seed=2)
    # decoder inputs are explicit so that logits can be computed without labels too
    decoder_ids = torch.cat([torch.zeros(2, 1, dtype=torch.long), labels[:, :-1]], dim=1)
    return {"input_ids": _ids(), "attention_mask": torch.ones(2, 7, dtype=torch.long),
            "decoder_input_ids": decoder_ids, "labels": labels}


TOYS = {
    "bert": Toy("bert", _bert, _cls_inputs),
    "gpt2": Toy("gpt2", _gpt2, _lm_inputs),
    "llama": Toy("llama", _llama, _lm_inputs),
    "t5": Toy("t5", _t5, _s2s_inputs),
}


def logits(model: nn.Module, inputs: dict) -> torch.Tensor:
    """The model's logits for ``inputs`` (no labels, no grad)."""
    with torch.no_grad():
        return model(**{k: v for k, v in inputs.items() if k != "labels"}).logits.clone()


# --- the checks -----------------------------------------------------------------------------

def check_only_adapter_parameters_train(toy: Toy, config: dt.MethodConfig) -> dt.AdaptedModel:
    """Only new (adapter) parameters have requires_grad; all of them get a gradient; no base one does."""
    base = toy.model()
    base_params = {id(p) for p in base.parameters()}
    model = dt.attach(base, config)
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert trainable, "the adapter has no trainable parameters"
    leaked = [n for n, p in trainable if id(p) in base_params]
    assert not leaked, f"base parameters set to train: {leaked[:5]}"
    model.train()
    model(**toy.inputs()).loss.backward()
    missing = [n for n, p in trainable if p.grad is None]
    assert not missing, f"adapter parameters without a gradient: {missing[:5]}"
    touched = [n for n, p in model.named_parameters() if id(p) in base_params and p.grad is not None]
    assert not touched, f"base parameters got gradients: {touched[:5]}"
    return model


def perturbed(model: dt.AdaptedModel, scale: float = 0.5) -> dt.AdaptedModel:
    """Move every trainable parameter away from its initial value, so the adapter changes outputs
    (most methods start as the identity, which would make the checks below vacuous)."""
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g).to(p.dtype) * scale)
    return model.eval()


def check_changes_and_disables(toy: Toy, config: dt.MethodConfig) -> None:
    """The (perturbed) adapter changes the output; ``disabled()`` gives the base output exactly."""
    inputs = toy.inputs()
    expected = logits(toy.model(), inputs)
    model = perturbed(dt.attach(toy.model(), config))
    assert not torch.allclose(logits(model, inputs), expected, atol=1e-4), "the adapter does not change the output"
    with model.disabled():
        torch.testing.assert_close(logits(model, inputs), expected, atol=1e-6, rtol=0)


def check_save_load(toy: Toy, config: dt.MethodConfig, tmp_path) -> dict:
    """Saved and loaded onto a fresh base, the adapter gives identical outputs. Returns the tensors."""
    from safetensors.torch import load_file

    inputs = toy.inputs()
    model = perturbed(dt.attach(toy.model(), config))
    expected = logits(model, inputs)
    model.save(tmp_path)
    loaded = dt.load(toy.model(), tmp_path).eval()
    torch.testing.assert_close(logits(loaded, inputs), expected, atol=1e-6, rtol=0)
    return load_file(str(tmp_path / "adapter_model.safetensors"))


def check_merge(toy: Toy, config: dt.MethodConfig) -> None:
    """merged == unmerged (1e-4); unmerge restores; merge_and_unload gives the plain class."""
    inputs = toy.inputs()
    model = perturbed(dt.attach(toy.model(), config))
    unmerged = logits(model, inputs)
    model.merge()
    torch.testing.assert_close(logits(model, inputs), unmerged, atol=1e-4, rtol=0)
    model.unmerge()
    torch.testing.assert_close(logits(model, inputs), unmerged, atol=1e-5, rtol=0)
    plain = model.merge_and_unload()
    assert type(plain) is type(toy.model())
    assert not any(isinstance(m, dt.core.layer.AdapterLayer) for m in plain.modules())
    torch.testing.assert_close(logits(plain, inputs), unmerged, atol=1e-4, rtol=0)


def check_remove_restores_base(toy: Toy, config: dt.MethodConfig) -> None:
    """Removing the only adapter gives back the base output and the original module types."""
    inputs = toy.inputs()
    reference = toy.model()
    expected = logits(reference, inputs)
    model = perturbed(dt.attach(toy.model(), config))
    model.remove("default")
    torch.testing.assert_close(logits(model, inputs), expected, atol=1e-6, rtol=0)
    assert [type(m) for m in model.base_model.modules()] == [type(m) for m in reference.modules()]


#: per row of a mixed batch, its adapter: two adapters and the base, a split segment on purpose
MIXED_NAMES = ["a", "b", dt.BASE_ADAPTER, "a"]


def repeated_rows(toy: Toy, copies: int) -> dict:
    """The toy's inputs (no labels) with every row repeated ``copies`` times along the batch."""
    return {k: torch.cat([v] * copies) for k, v in toy.inputs().items() if k != "labels"}


def one_by_one(model: dt.AdaptedModel, inputs: dict, names: list[str], **options) -> torch.Tensor:
    """The logits of each row run alone, with its adapter active (or all disabled for the base);
    ``options`` go to every call as they are (e.g. ``use_cache=False``)."""
    outs = []
    for i, name in enumerate(names):
        row = {**{k: v[i:i + 1] for k, v in inputs.items()}, **options}
        if name == dt.BASE_ADAPTER:
            with model.disabled():
                outs.append(logits(model, row))
        else:
            model.use(name)
            outs.append(logits(model, row))
    return torch.cat(outs)


def check_mixed_batch(toy: Toy, config: dt.MethodConfig, *, refused: str | None = None, **options) -> None:
    """With two (different) adapters, a mixed batch (``adapter_names=``) gives each row what it
    gives run alone through its own adapter; or, where ``refused`` (a pattern of the expected
    message) says so, the call is refused with a clear error. ``options`` go to every call."""
    model = dt.attach(toy.model(), config, name="a")
    model.add(config, name="b")
    perturbed(model)
    inputs = repeated_rows(toy, 2)
    if refused:
        with pytest.raises(dt.AdapterError, match=refused):
            model(**inputs, **options, adapter_names=MIXED_NAMES)
        return
    with torch.no_grad():
        mixed = model(**inputs, **options, adapter_names=MIXED_NAMES).logits
    expected = one_by_one(model, inputs, MIXED_NAMES, **options)
    # rows 0 and 2 share an input, as do rows 1 and 3 (a, base; b, a): the adapters must matter
    assert not torch.allclose(expected[0], expected[2], atol=1e-4), "adapter a does not change the output"
    assert not torch.allclose(expected[1], expected[3], atol=1e-4), "adapters a and b give the same output"
    # a batch of one and a batch of four round differently; a routing error would be O(1)
    torch.testing.assert_close(mixed, expected, atol=1e-4, rtol=1e-4)
    assert all(layer.routing is None for _, layer in model.adapter_layers())


def check_trainable_count(toy: Toy, config: dt.MethodConfig, expected: int) -> None:
    """The trainable parameter count equals ``expected`` (a formula, or peft's count)."""
    model = dt.attach(toy.model(), config)
    trainable, _ = model.parameter_counts()
    assert trainable == expected, f"{trainable} trainable parameters, expected {expected}"


def copy_of(toy: Toy) -> nn.Module:
    """A deep copy of the toy's base model (for peft, which also edits its base in place)."""
    return copy.deepcopy(toy.model())


def assert_fused_path_equals_plain(model: dt.AdaptedModel, inputs: dict, layer_cls: type, monkeypatch) -> dict:
    """Logits and every gradient of a training step agree (1e-5) between ``layer_cls``'s fused
    autograd node and its plain autograd path; returns the plain path's gradients."""
    def run(fused: bool):
        monkeypatch.setattr(layer_cls, "use_fused", fused)
        model.zero_grad(set_to_none=True)
        torch.manual_seed(0)  # the same dropout masks in the base model for both paths
        out = model(**inputs)
        out.loss.backward()
        # (with two active adapters only the first one's classification head takes part)
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return out.logits.detach().clone(), grads

    fused_logits, fused_grads = run(True)
    plain_logits, plain_grads = run(False)
    torch.testing.assert_close(fused_logits, plain_logits, atol=1e-5, rtol=1e-5)
    assert fused_grads.keys() == plain_grads.keys() and len(plain_grads) > 0
    for name in plain_grads:
        torch.testing.assert_close(fused_grads[name], plain_grads[name], atol=1e-5, rtol=1e-4, msg=name)
    return plain_grads
