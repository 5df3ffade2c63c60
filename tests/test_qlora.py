"""QLoRA: LoRA over bitsandbytes 4-bit NF4 (and 8-bit) base layers, checked against the layers'
own dequantized weights and against a full-precision model."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import deltatune as dt

bnb = pytest.importorskip("bitsandbytes", reason="QLoRA needs bitsandbytes (the quant extra)")

VOCAB = 96


def tiny_llama() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)).eval()


def ids(batch: int = 2, length: int = 9) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(3))


def dequantized_twin(quantized: nn.Module) -> nn.Module:
    """A full-precision model holding exactly the quantized model's dequantized weights."""
    from deltatune.core.quantized import handler_for
    twin = copy.deepcopy(quantized)
    for path, module in list(twin.named_modules()):
        handler = handler_for(module)
        if handler is not None:
            twin.set_submodule(path, handler.dequantize(module))
    return twin


def logits(model, x):
    with torch.no_grad():
        return model(input_ids=x).logits


@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_linear_matches_its_dequantized_weights(bits):
    layer = nn.Linear(64, 48)
    model = nn.Sequential(layer)
    q = dt.quantize(model, bits=bits)[0]
    assert type(q).__name__ == ("Linear4bit" if bits == 4 else "Linear8bitLt")
    x = torch.randn(5, 64)
    dense = dequantized_twin(nn.Sequential(q))[0]
    assert isinstance(dense, nn.Linear)
    torch.testing.assert_close(q(x), x @ dense.weight.T + dense.bias, atol=2e-5, rtol=1e-4)
    # and the dequantized weight is close to the original (NF4 error bound, 8-bit much tighter)
    err = (dense.weight - layer.weight).abs().max().item()
    assert err < (0.05 if bits == 4 else 0.005)


def test_quantize_keeps_the_output_head_and_reports_about_4_bits():
    model = dt.quantize(tiny_llama(), bits=4)
    assert type(model.lm_head) is nn.Linear
    assert type(model.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
    report = dt.quantization_report(model)
    # 2 layers x (q 64x64, k 64x32, v 64x32, o 64x64, gate/up 64x128 each, down 128x64)
    expected = 2 * (64 * 64 + 2 * 64 * 32 + 64 * 64 + 3 * 64 * 128)
    assert report.quantized_params == expected
    # NF4 data (4 bits) + 8-bit block scales per 64 + fp32 second-level scales per 256 blocks
    assert 4.12 < report.bits_per_quantized_param < 4.2


def test_lora_gradients_flow_through_a_4bit_base():
    model = dt.attach(dt.quantize(tiny_llama(), bits=4), dt.LoraConfig(r=4, targets="all-linear", init="random"))
    model.train()
    x = ids()
    model(input_ids=x, labels=x).loss.backward()
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(p.grad is not None and p.grad.abs().sum() > 0 for _, p in trainable)
    assert all("lora_" in n for n, _ in trainable)
    # the count is of real parameters, not of packed 4-bit storage elements
    _, total = model.parameter_counts()
    assert total == sum(p.numel() for p in tiny_llama().parameters()) + sum(p.numel() for _, p in trainable)


def test_4bit_lora_equals_lora_on_the_dequantized_weights_after_save_and_load(tmp_path):
    quantized = dt.quantize(tiny_llama(), bits=4)
    twin = dequantized_twin(quantized)
    model = dt.attach(quantized, dt.LoraConfig(r=4, targets=["q", "v", "down"], init="random")).eval()
    model.save(tmp_path)
    on_twin = dt.load(twin, tmp_path).eval()
    torch.testing.assert_close(logits(on_twin, ids()), logits(model, ids()), atol=1e-5, rtol=1e-5)
    # and the same file loads onto the original full-precision model
    on_fp32 = dt.load(tiny_llama(), tmp_path).eval()
    assert on_fp32.base_model.model.layers[0].self_attn.q_proj.lora_A["default"].weight.shape == (4, 64)
    assert torch.isfinite(logits(on_fp32, ids())).all()


@pytest.mark.parametrize("bits", [4, 8])
def test_merge_and_unload_dequantizes_and_matches(bits):
    model = dt.attach(dt.quantize(tiny_llama(), bits=bits), dt.LoraConfig(r=4, targets="all-linear", init="random"))
    model.eval()
    expected = logits(model, ids())
    with pytest.raises(dt.AdapterError, match="merge_and_unload"):
        model.merge()
    plain = model.merge_and_unload()
    assert all(type(m) is nn.Linear for n, m in plain.named_modules() if n.endswith(("_proj", "lm_head")))
    # 4-bit layers compute with their dequantized weights, so merging is exact to float rounding;
    # LLM.int8 layers also quantize the activations, which the merged fp32 model no longer does
    tolerance = 1e-4 if bits == 4 else 5e-3
    torch.testing.assert_close(logits(plain, ids()), expected, atol=tolerance, rtol=0)


def test_merge_and_unload_can_requantize_with_a_warning():
    model = dt.attach(dt.quantize(tiny_llama(), bits=4), dt.LoraConfig(r=4, targets=["q", "v"], init="random"))
    model.eval()
    expected = logits(model, ids())
    with pytest.warns(UserWarning, match="re-quantizing"):
        plain = model.merge_and_unload(requantize=True)
    assert type(plain.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
    assert type(plain.model.layers[0].mlp.up_proj).__name__ == "Linear4bit"  # never adapted: untouched
    err = (logits(plain, ids()) - expected).abs().max().item()
    assert 0 < err < 0.5  # lossy, but still the same model


def test_transformers_bitsandbytes_loading_path(tmp_path):
    from transformers import BitsAndBytesConfig, LlamaForCausalLM
    tiny_llama().save_pretrained(tmp_path / "base")
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                bnb_4bit_compute_dtype=torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base = LlamaForCausalLM.from_pretrained(tmp_path / "base", quantization_config=config, device_map="cpu")
    model = dt.attach(base, dt.LoraConfig(r=4, targets=["q", "v"], init="random")).eval()
    expected = logits(model, ids())
    plain = model.merge_and_unload()
    assert type(plain.model.layers[1].self_attn.v_proj) is nn.Linear
    torch.testing.assert_close(logits(plain, ids()), expected, atol=1e-4, rtol=1e-4)


def test_prepare_for_kbit_training_freezes_casts_and_checkpoints():
    model = tiny_llama()
    model.model.norm.to(torch.bfloat16)
    model = dt.prepare_for_kbit_training(dt.quantize(model, bits=4))
    assert not any(p.requires_grad for p in model.parameters())
    assert model.model.norm.weight.dtype == torch.float32
    assert model.is_gradient_checkpointing
    adapted = dt.attach(model, dt.LoraConfig(r=4, targets=["q", "v"], init="random"))
    adapted.train()
    x = ids()
    adapted(input_ids=x, labels=x).loss.backward()
    assert all(p.grad is not None for p in adapted.parameters() if p.requires_grad)


def test_quantize_rejects_bad_arguments():
    with pytest.raises(dt.ConfigError, match="bits"):
        dt.quantize(tiny_llama(), bits=3)
    with pytest.raises(dt.ConfigError, match="quant_type"):
        dt.quantize(tiny_llama(), quant_type="int4")


SHAKESPEARE = __import__("pathlib").Path(__file__).resolve().parents[1].parent / "shared/data/tinyshakespeare/input.txt"


def shakespeare_text() -> str:
    if not SHAKESPEARE.is_file():
        pytest.skip(f"tiny-shakespeare not found at {SHAKESPEARE} (the shared data folder is absent)")
    return SHAKESPEARE.read_text(encoding="utf-8")


def qlora_finetune(model, train: torch.Tensor, held: torch.Tensor, steps: int, lr: float, batch: int):
    """Held-out loss before and after ``steps`` AdamW steps of LoRA over a 4-bit base."""
    def held_out_loss() -> float:
        model.eval()
        with torch.no_grad():
            return model(input_ids=held, labels=held).loss.item()
    before = held_out_loss()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        model.train()
        rows = train[torch.randint(0, len(train), (batch,), generator=g)]
        model(input_ids=rows, labels=rows).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return before, held_out_loss()


def test_qlora_on_tiny_shakespeare_lowers_the_held_out_loss():
    text = shakespeare_text()
    codes = torch.tensor([ord(c) % VOCAB for c in text[:40_000]])  # characters as a toy vocabulary
    blocks = codes[: len(codes) // 32 * 32].view(-1, 32)
    model = dt.attach(dt.prepare_for_kbit_training(dt.quantize(tiny_llama(), bits=4), gradient_checkpointing=False),
                      dt.LoraConfig(r=8, alpha=16, targets="all-linear"))
    before, after = qlora_finetune(model, blocks[:-8], blocks[-8:], steps=40, lr=1e-2, batch=16)
    assert after < before - 0.1, (before, after)  # eval mode: deterministic, so any drop is learning


@pytest.mark.slow
def test_qlora_smollm2_on_tiny_shakespeare_lowers_the_held_out_loss():
    text = shakespeare_text()
    tokenizer = dt.load_tokenizer("smollm2")
    model = dt.load_model("smollm2", auto_class="AutoModelForCausalLM")
    dt.prepare_for_kbit_training(dt.quantize(model, bits=4), gradient_checkpointing=False)
    assert 4.12 < dt.quantization_report(model).bits_per_quantized_param < 4.14
    ids = tokenizer(text[:30_000], return_tensors="pt").input_ids[0]
    blocks = ids[: len(ids) // 64 * 64].view(-1, 64)
    model = dt.attach(model, dt.LoraConfig(r=8, alpha=16, targets=["q", "k", "v", "o"]))
    before, after = qlora_finetune(model, blocks[:-4], blocks[-4:], steps=10, lr=3e-4, batch=4)
    assert after < before, (before, after)


@pytest.mark.slow
def test_smollm2_from_gguf_merges_and_saves_as_a_plain_model(tmp_path):
    """The GGUF checkpoint is dequantized on load; transformers still flags it as quantized and
    would refuse save_pretrained, which `deltatune merge` needs."""
    from transformers import AutoModelForCausalLM

    model = dt.attach(dt.load_model("smollm2", auto_class="AutoModelForCausalLM"),
                      dt.LoraConfig(r=4, targets=["q", "v"], init="random")).eval()
    ids = torch.tensor([[1, 20, 300, 4000, 5]])
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    merged = model.merge_and_unload()
    merged.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, expected, atol=1e-4, rtol=1e-4)
