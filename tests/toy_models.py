"""Tiny random transformers models (hidden 32, vocab 100) and the helpers the tests share: the one
set of toys, for the core tests and for the method contract (tests/methods/contract.py).

Every base model is built once per session from a fixed seed and handed out as a deep copy, so
two calls to :meth:`Toy.base` give bit-identical, independent models (one for deltatune, one
for peft or as the untouched reference).
"""

from __future__ import annotations

import copy
import functools
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

import deltatune as dt

VOCAB = 100
BATCH, SEQ, TARGET_SEQ = 2, 7, 5


def token_ids(batch: int = BATCH, length: int = SEQ, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


# --- the four model families ---------------------------------------------------------------

def build_bert(layers: int = 4) -> nn.Module:
    from transformers import BertConfig, BertForSequenceClassification
    return BertForSequenceClassification(BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=layers, num_attention_heads=4, intermediate_size=48,
        max_position_embeddings=32, num_labels=3))


def build_gpt2(layers: int = 4) -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel
    return GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=layers, n_head=4, n_positions=32,
                                      bos_token_id=1, eos_token_id=2, pad_token_id=0))


def build_llama(layers: int = 4, **config) -> nn.Module:
    """The LLaMA toy; ``config`` adds LlamaConfig fields (e.g. ``attention_bias=True``)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    return LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48,
                                        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                                        max_position_embeddings=32, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                                        **config))


def build_t5(encoder_layers: int = 2, decoder_layers: int = 2, gated: bool = False) -> nn.Module:
    from transformers import T5Config, T5ForConditionalGeneration
    return T5ForConditionalGeneration(T5Config(
        vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=48, num_layers=encoder_layers, num_decoder_layers=decoder_layers,
        num_heads=4, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
        feed_forward_proj="gated-gelu" if gated else "relu"))


def _classification_batch() -> dict:
    return {"input_ids": token_ids(), "attention_mask": torch.ones(BATCH, SEQ, dtype=torch.long)}


def _lm_batch() -> dict:
    ids = token_ids()
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _seq2seq_batch() -> dict:
    target = token_ids(BATCH, TARGET_SEQ, seed=2)
    start = torch.zeros(BATCH, 1, dtype=torch.long)  # decoder_start_token_id
    return {"input_ids": token_ids(), "attention_mask": torch.ones(BATCH, SEQ, dtype=torch.long),
            "decoder_input_ids": torch.cat([start, target[:, :-1]], dim=1)}


@dataclass(frozen=True)
class Toy:
    """A tiny model family: how to build it, a batch for it, and facts the tests check against."""

    name: str
    build: Callable[[], nn.Module]
    make_batch: Callable[[], dict]
    peft_task: str
    #: loss labels for a training step (None: a bare model without a loss)
    make_labels: Callable[[dict], torch.Tensor] | None
    #: the output heads that "all-linear" must leave alone
    heads: tuple[str, ...] = ()
    #: the peft names of the modules deltatune's ["q", "v"] selects
    qv_names: tuple[str, ...] = ()
    #: a path prefix for block ``i``'s transformer layer (not for T5, which has two stacks)
    block: str = ""
    n_blocks: int = 4

    def base(self) -> nn.Module:
        """A fresh deep copy of this family's seeded base model, in eval mode."""
        return copy.deepcopy(_pristine(self))

    def batch(self) -> dict:
        return self.make_batch()

    def loss_batch(self) -> dict:
        """:meth:`batch` with the loss labels (the batch alone for a toy without labels)."""
        batch = self.make_batch()
        return batch if self.make_labels is None else {**batch, "labels": self.make_labels(batch)}


@functools.cache
def _pristine(toy: Toy) -> nn.Module:
    torch.manual_seed(0)
    return toy.build().eval()


TOYS: dict[str, Toy] = {
    "bert": Toy("bert", build_bert, _classification_batch, "SEQ_CLS", lambda b: torch.tensor([0, 2]),
                heads=("classifier",), qv_names=("query", "value"), block="bert.encoder.layer"),
    "gpt2": Toy("gpt2", build_gpt2, _lm_batch, "CAUSAL_LM", lambda b: b["input_ids"],
                heads=("lm_head",), qv_names=("c_attn",), block="transformer.h"),
    "llama": Toy("llama", build_llama, _lm_batch, "CAUSAL_LM", lambda b: b["input_ids"],
                 heads=("lm_head",), qv_names=("q_proj", "v_proj"), block="model.layers"),
    "t5": Toy("t5", build_t5, _seq2seq_batch, "SEQ_2_SEQ_LM", lambda b: token_ids(BATCH, TARGET_SEQ, seed=2),
              heads=("lm_head",), qv_names=("q", "v"), n_blocks=2),
}


class LayerZoo(nn.Module):
    """One of each layer kind LoRA wraps, outside any transformers model."""

    def __init__(self) -> None:
        super().__init__()
        from transformers.pytorch_utils import Conv1D
        self.lin = nn.Linear(12, 10)
        self.conv1d = Conv1D(10, 12)  # GPT-2's layer: weight stored [in=12, out=10]
        self.emb = nn.Embedding(20, 6, padding_idx=0)
        self.conv3 = nn.Conv2d(3, 5, kernel_size=3, stride=2, padding=1)
        self.conv1 = nn.Conv2d(3, 5, kernel_size=1)

    def forward(self, x, layer: str = "lin"):
        return self.get_submodule(layer)(x)


def layer_zoo() -> LayerZoo:
    torch.manual_seed(11)
    return LayerZoo().eval()


def zoo_input(layer: str) -> torch.Tensor:
    """An input for one of the :class:`LayerZoo` layers."""
    gen = torch.Generator().manual_seed(5)
    if layer == "emb":
        return torch.tensor([[0, 3, 19], [7, 7, 1]])
    if layer.startswith("conv") and layer != "conv1d":
        return torch.randn(2, 3, 9, 9, generator=gen)
    return torch.randn(2, 3, 12, generator=gen)


# --- helpers -------------------------------------------------------------------------------

def logits(model: nn.Module, batch: dict) -> torch.Tensor:
    """The model's logits for ``batch`` (its labels left out), without gradients."""
    with torch.no_grad():
        return model(**{k: v for k, v in batch.items() if k != "labels"}).logits.detach().clone()


def assert_same(actual: torch.Tensor, expected: torch.Tensor, atol: float = 1e-6) -> None:
    torch.testing.assert_close(actual, expected, atol=atol, rtol=0)


def assert_differs(actual: torch.Tensor, expected: torch.Tensor, by: float = 1e-3) -> None:
    """The adapter really changes the output (else the equality checks around it prove nothing)."""
    gap = (actual - expected).abs().max().item()
    assert gap > by, f"outputs differ by only {gap:.2e}: the adapter has no effect"


def randomize(model: nn.Module, *, only: Callable[[str], bool] = lambda name: True, seed: int = 7,
              scale: float = 0.3) -> nn.Module:
    """Add noise to every trainable parameter whose name passes ``only`` (e.g. a classifier copy,
    which starts equal to the base head), so that a lost or mixed-up tensor shows in the outputs."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad and only(name):
                p.add_(torch.randn(p.shape, generator=gen).to(p.dtype) * scale)
    return model


def is_lora_param(name: str) -> bool:
    return any(f".{part}." in f".{name}." for part in ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B"))


def is_head_copy(name: str) -> bool:
    return ".modules_to_save." in name


def lora_paths(model: nn.Module) -> list[str]:
    """Paths (relative to the user's base model) of the modules that carry LoRA factors."""
    root = model.base_model if isinstance(model, dt.AdaptedModel) else model
    return [path for path, m in root.named_modules() if hasattr(m, "lora_A") or hasattr(m, "lora_embedding_A")]


def module_types(model: nn.Module) -> list[tuple[str, type]]:
    return [(path, type(m)) for path, m in model.named_modules()]


def linear_paths(model: nn.Module) -> list[str]:
    """Every nn.Linear / GPT-2 Conv1D of a plain model."""
    from transformers.pytorch_utils import Conv1D
    return [path for path, m in model.named_modules() if isinstance(m, (nn.Linear, Conv1D))]


def peft_lora(toy: Toy | None, base: nn.Module, **kwargs) -> nn.Module:
    """``peft.get_peft_model`` with a LoraConfig of ``kwargs`` (the toy's task type), in eval mode."""
    import peft
    if toy is not None:
        kwargs.setdefault("task_type", toy.peft_task)
    return peft.get_peft_model(base, peft.LoraConfig(**kwargs)).eval()
