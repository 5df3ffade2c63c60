"""The CPU dropout of core/dropout.py is dropout: each element kept with probability 1 - p and
scaled by 1 / (1 - p), gradients through the same mask, masks fixed by torch's seed; the
written-out softmax attention of core/attention_dropout.py equals torch's SDPA."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from deltatune.core.attention_dropout import attention_with_dropout
from deltatune.core.dropout import dropout, fast_dropout, keep_mask, plain_dropouts, scoped_dropout


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_masks_keep_each_element_with_probability_one_minus_p(p):
    torch.manual_seed(0)
    n = 1_000_000
    kept = keep_mask((1000, 1000), p).float()
    sigma = math.sqrt(n * p * (1 - p))
    assert abs(float(kept.sum()) - n * (1 - p)) < 5 * sigma
    # neighbours are independent: the two halves of each 64-bit draw do not agree more than chance
    pairs = kept.view(-1, 2)
    both = float((pairs[:, 0] * pairs[:, 1]).sum())
    assert abs(both - n / 2 * (1 - p) ** 2) < 5 * math.sqrt(n / 2 * (1 - p) ** 2 * (1 - (1 - p) ** 2))


def test_dropout_zeroes_or_scales_and_its_gradient_uses_the_same_mask():
    torch.manual_seed(1)
    x = (torch.rand(300, 200) + 0.5).requires_grad_()
    out = dropout(x, 0.2)
    dropped = out == 0
    assert 0.15 < float(dropped.float().mean()) < 0.25
    torch.testing.assert_close(out[~dropped], x[~dropped] / 0.8)
    out.sum().backward()
    torch.testing.assert_close(x.grad, (~dropped).float() / 0.8)
    assert dropout(x, 0.2, training=False) is x and dropout(x, 0.0) is x


def test_masks_follow_torchs_seed():
    x = torch.ones(64, 64)
    torch.manual_seed(7)
    first, second = dropout(x, 0.3), dropout(x, 0.3)
    torch.manual_seed(7)
    assert torch.equal(dropout(x, 0.3), first) and torch.equal(dropout(x, 0.3), second)
    assert not torch.equal(first, second)
    state = torch.get_rng_state()  # what a checkpoint saves and a resume restores
    later = dropout(x, 0.3)
    torch.set_rng_state(state)
    assert torch.equal(dropout(x, 0.3), later)


def test_fast_dropout_swaps_plain_dropout_modules_for_the_block_only():
    class Custom(nn.Dropout):  # a subclass may do more than dropout: left alone
        pass

    model = nn.Sequential(nn.Linear(8, 8), nn.Dropout(0.5), Custom(0.5), nn.Dropout(0.0)).train()
    x = torch.randn(4, 8)
    with fast_dropout(plain_dropouts(model)):
        assert "forward" in vars(model[1]) and "forward" not in vars(model[2]) and "forward" not in vars(model[3])
        torch.manual_seed(3)
        hidden = model[0](x)
        expected_mask = keep_mask(hidden.shape, 0.5)
        torch.manual_seed(3)
        torch.testing.assert_close(model[1](hidden), hidden * expected_mask / 0.5)
    assert all("forward" not in vars(m) for m in model)
    model.eval()
    with fast_dropout(plain_dropouts(model)):
        torch.testing.assert_close(model[1](x), x)  # eval mode: no dropout, as nn.Dropout


@pytest.mark.parametrize("causal, ragged, kv_heads", [(False, True, 4), (True, False, 4), (True, False, 2),
                                                      (False, False, 2)])
def test_written_out_attention_equals_sdpa(causal, ragged, kv_heads):
    torch.manual_seed(0)
    q = torch.randn(3, 4, 6, 8)
    k, v = torch.randn(3, kv_heads, 6, 8), torch.randn(3, kv_heads, 6, 8)
    lengths = torch.tensor([6, 4, 2]) if ragged else torch.tensor([6, 6, 6])
    key_mask = (torch.arange(6)[None] < lengths[:, None])[:, None, None, :] if ragged else None
    got = attention_with_dropout(q, k, v, key_mask, causal, 0.0, 0.3)
    repeat = 4 // kv_heads
    expected = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(repeat, 1), v.repeat_interleave(repeat, 1), attn_mask=key_mask, is_causal=causal,
        scale=0.3)
    torch.testing.assert_close(got, expected.transpose(1, 2), rtol=1e-5, atol=1e-6)


def test_written_out_attention_drops_probabilities_with_the_same_masks():
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 4, 5, 8), torch.randn(2, 4, 5, 8), torch.randn(2, 4, 5, 8)
    torch.manual_seed(11)
    got = attention_with_dropout(q, k, v, None, False, 0.25, None)
    torch.manual_seed(11)
    probs = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(8), dim=-1)
    expected = (probs * keep_mask(probs.shape, 0.25) / 0.75) @ v
    torch.testing.assert_close(got, expected.transpose(1, 2), rtol=1e-5, atol=1e-6)


def test_dropout_keeps_a_byte_an_element_for_the_backward():
    """torch's dropout keeps its boolean mask; so does this one (a float factor would hold four)."""
    saved = []
    x = torch.randn(64, 32, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        dropout(x, 0.3)
    assert [(t.dtype, t.numel()) for t in saved] == [(torch.bool, x.numel())]


def test_a_mask_built_in_pieces_is_the_mask_of_one_draw():
    x = torch.ones(3 * 65536 + 7)  # three whole pieces and a short, odd one
    torch.manual_seed(4)
    out = dropout(x, 0.4)
    torch.manual_seed(4)
    torch.testing.assert_close(out, keep_mask(x.shape, 0.4) / 0.6, rtol=0, atol=0)


def test_scoped_dropout_draws_deltatunes_masks_within_a_scope_and_torchs_outside():
    x = torch.rand(64, 48) + 0.5
    torch.manual_seed(3)
    ours = dropout(x, 0.3)
    torch.manual_seed(3)
    torchs = torch.nn.functional.dropout(x, 0.3)
    assert not torch.equal(ours, torchs)
    with fast_dropout([]):
        torch.manual_seed(3)
        torch.testing.assert_close(scoped_dropout(x, 0.3), ours, rtol=0, atol=0)
    torch.manual_seed(3)
    torch.testing.assert_close(scoped_dropout(x, 0.3), torchs, rtol=0, atol=0)


@pytest.mark.parametrize("cpu_dropout", [True, False])
def test_loras_own_dropout_follows_the_models_cpu_dropout(cpu_dropout):
    """LoRA's dropout on its input: deltatune's masks in a training forward on a CPU, torch's
    with ``cpu_dropout`` off; the output is the base's plus the scaled update of the dropped input."""
    import deltatune as dt

    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(48, 40))
    model = dt.attach(base, dt.LoraConfig(r=4, alpha=8, dropout=0.4, init="random", targets=["0"])).train()
    model.cpu_dropout = cpu_dropout
    layer = model.base_model[0]
    x = torch.rand(32, 48) + 0.5
    torch.manual_seed(7)
    got = model(x)
    torch.manual_seed(7)
    dropped = dropout(x, 0.4) if cpu_dropout else torch.nn.functional.dropout(x, 0.4)
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    with torch.no_grad():
        base_out = torch.nn.functional.linear(x, layer.base_layer.weight, layer.base_layer.bias)
        want = base_out + 2.0 * dropped @ a.t() @ b.t()  # scale alpha / r = 8 / 4
    torch.testing.assert_close(got, want)
