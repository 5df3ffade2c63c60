"""The method contract, written once for every method: the checks that every adapter must pass
against the base model's own outputs, on the tiny models of tests/toy_models.py.

A method's test module parametrizes over :data:`TOYS` and calls the ``check_*`` functions with a
config factory; method-specific checks (formulas, peft parity) live in that module.
"""

from __future__ import annotations

import pytest
import torch

import deltatune as dt
from tests.toy_models import TOYS, Toy, logits  # noqa: F401  (re-exported for the method tests)


# --- the checks -----------------------------------------------------------------------------

def check_only_adapter_parameters_train(toy: Toy, config: dt.MethodConfig) -> dt.AdaptedModel:
    """Only new (adapter) parameters have requires_grad; all of them get a gradient; no base one does."""
    base = toy.base()
    base_params = {id(p) for p in base.parameters()}
    model = dt.attach(base, config)
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert trainable, "the adapter has no trainable parameters"
    leaked = [n for n, p in trainable if id(p) in base_params]
    assert not leaked, f"base parameters set to train: {leaked[:5]}"
    model.train()
    model(**toy.loss_batch()).loss.backward()
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
    inputs = toy.batch()
    expected = logits(toy.base(), inputs)
    model = perturbed(dt.attach(toy.base(), config))
    assert not torch.allclose(logits(model, inputs), expected, atol=1e-4), "the adapter does not change the output"
    with model.disabled():
        torch.testing.assert_close(logits(model, inputs), expected, atol=1e-6, rtol=0)


def check_save_load(toy: Toy, config: dt.MethodConfig, tmp_path) -> dict:
    """Saved and loaded onto a fresh base, the adapter gives identical outputs. Returns the tensors."""
    from safetensors.torch import load_file

    inputs = toy.batch()
    model = perturbed(dt.attach(toy.base(), config))
    expected = logits(model, inputs)
    model.save(tmp_path)
    loaded = dt.load(toy.base(), tmp_path).eval()
    torch.testing.assert_close(logits(loaded, inputs), expected, atol=1e-6, rtol=0)
    return load_file(str(tmp_path / "adapter_model.safetensors"))


def check_merge(toy: Toy, config: dt.MethodConfig) -> None:
    """merged == unmerged (1e-4); unmerge restores; merge_and_unload gives the plain class."""
    inputs = toy.batch()
    model = perturbed(dt.attach(toy.base(), config))
    unmerged = logits(model, inputs)
    model.merge()
    torch.testing.assert_close(logits(model, inputs), unmerged, atol=1e-4, rtol=0)
    model.unmerge()
    torch.testing.assert_close(logits(model, inputs), unmerged, atol=1e-5, rtol=0)
    plain = model.merge_and_unload()
    assert type(plain) is type(toy.base())
    assert not any(isinstance(m, dt.core.layer.AdapterLayer) for m in plain.modules())
    torch.testing.assert_close(logits(plain, inputs), unmerged, atol=1e-4, rtol=0)


def check_remove_restores_base(toy: Toy, config: dt.MethodConfig) -> None:
    """Removing the only adapter gives back the base output and the original module types."""
    inputs = toy.batch()
    reference = toy.base()
    expected = logits(reference, inputs)
    model = perturbed(dt.attach(toy.base(), config))
    model.remove("default")
    torch.testing.assert_close(logits(model, inputs), expected, atol=1e-6, rtol=0)
    assert [type(m) for m in model.base_model.modules()] == [type(m) for m in reference.modules()]


#: per row of a mixed batch, its adapter: two adapters and the base, a split segment on purpose
MIXED_NAMES = ["a", "b", dt.BASE_ADAPTER, "a"]


def repeated_rows(toy: Toy, copies: int) -> dict:
    """The toy's batch (no labels) with every row repeated ``copies`` times along the batch."""
    return {k: torch.cat([v] * copies) for k, v in toy.batch().items()}


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
    model = dt.attach(toy.base(), config, name="a")
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


def check_contract(toy: Toy, config: dt.MethodConfig, tmp_path, *, mergeable: bool = True) -> dict:
    """Every check above in turn (merging where ``mergeable``); returns the saved tensors."""
    check_only_adapter_parameters_train(toy, config)
    check_changes_and_disables(toy, config)
    tensors = check_save_load(toy, config, tmp_path)
    if mergeable:
        check_merge(toy, config)
    check_remove_restores_base(toy, config)
    check_mixed_batch(toy, config)
    return tensors


def check_trainable_count(toy: Toy, config: dt.MethodConfig, expected: int) -> None:
    """The trainable parameter count equals ``expected`` (a formula, or peft's count)."""
    model = dt.attach(toy.base(), config)
    trainable, _ = model.parameter_counts()
    assert trainable == expected, f"{trainable} trainable parameters, expected {expected}"


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
