"""A zoo of tiny random transformers models, one per architecture family, built from config
classes (hidden 32, two layers, vocabulary 100); nothing is downloaded.

Each :class:`ZooEntry` says how to build the model, which kind of batch it takes and whether it
generates. The alias expectations live in the tests, written from each family's layout.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch
from torch import nn

VOCAB = 100
_SMALL = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
              max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)
_MOE = dict(num_local_experts=4, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
            shared_expert_intermediate_size=24, decoder_sparse_step=1, mlp_only_layers=[])


@dataclass(frozen=True, eq=False)
class ZooEntry:
    """One architecture family: its model_type, model class, config overrides and batch kind."""

    model_type: str
    model_class: str
    overrides: dict = field(default_factory=dict)
    #: "lm" (input_ids), "seq2seq" (input_ids + decoder_input_ids), "cls" (input_ids, classifier),
    #: "image" (pixel_values), "audio" (input_values), "whisper" (input_features + decoder ids)
    batch_kind: str = "lm"
    generates: bool = False
    base_keys: tuple[str, ...] = tuple(_SMALL)

    def build(self) -> nn.Module:
        """A fresh seeded model in eval mode."""
        return copy_of(self)

    def batch(self) -> dict:
        return make_batch(self.batch_kind)


@functools.cache
def _pristine(model_type: str) -> nn.Module:
    import transformers
    entry = ZOO[model_type]
    kwargs = {k: v for k, v in _SMALL.items() if k in entry.base_keys}
    config = transformers.AutoConfig.for_model(entry.model_type, **{**kwargs, **entry.overrides})
    torch.manual_seed(0)
    return getattr(transformers, entry.model_class)(config).eval()


def copy_of(entry: ZooEntry) -> nn.Module:
    import copy
    return copy.deepcopy(_pristine(entry.model_type))


def make_batch(kind: str) -> dict:
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(3, VOCAB, (2, 7), generator=gen)
    mask = torch.ones_like(ids)
    if kind in ("lm", "cls"):
        return {"input_ids": ids, "attention_mask": mask}
    if kind == "seq2seq":
        return {"input_ids": ids, "attention_mask": mask, "decoder_input_ids": ids[:, :5]}
    if kind == "image":
        return {"pixel_values": torch.randn(2, 3, 32, 32, generator=gen)}
    if kind == "audio":
        return {"input_values": torch.randn(2, 1600, generator=gen)}
    if kind == "whisper":
        return {"input_features": torch.randn(2, 8, 64, generator=gen), "decoder_input_ids": ids[:, :5]}
    raise ValueError(kind)


def _lm(model_type: str, cls: str, **overrides) -> ZooEntry:
    return ZooEntry(model_type, cls, overrides, "lm", generates=True)


def _moe(model_type: str, cls: str, **overrides) -> ZooEntry:
    return ZooEntry(model_type, cls, {**_MOE, **overrides}, "lm", generates=True)


def _cls(model_type: str, cls: str, **overrides) -> ZooEntry:
    return ZooEntry(model_type, cls, {"num_labels": 3, **overrides}, "cls")


def _s2s(model_type: str, cls: str, **overrides) -> ZooEntry:
    small = dict(d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                 decoder_attention_heads=4, encoder_ffn_dim=48, decoder_ffn_dim=48, decoder_start_token_id=2)
    return ZooEntry(model_type, cls, {**small, **overrides}, "seq2seq", generates=True,
                    base_keys=("vocab_size", "max_position_embeddings", "pad_token_id", "bos_token_id",
                               "eos_token_id"))


_VISION = dict(image_size=32, patch_size=8, num_channels=3, num_labels=3)

ZOO: dict[str, ZooEntry] = {e.model_type: e for e in [
    # decoder language models
    _lm("llama", "LlamaForCausalLM", num_key_value_heads=2),
    _lm("mistral", "MistralForCausalLM", num_key_value_heads=2),
    _lm("qwen2", "Qwen2ForCausalLM", num_key_value_heads=2),
    _lm("qwen3", "Qwen3ForCausalLM", num_key_value_heads=2, head_dim=8),
    _lm("gemma", "GemmaForCausalLM", num_key_value_heads=2, head_dim=8),
    _lm("gemma2", "Gemma2ForCausalLM", num_key_value_heads=2, head_dim=8),
    _lm("phi", "PhiForCausalLM"),
    _lm("phi3", "Phi3ForCausalLM", num_key_value_heads=2),
    _lm("olmo", "OlmoForCausalLM"),
    _lm("starcoder2", "Starcoder2ForCausalLM", num_key_value_heads=2),
    _lm("gpt2", "GPT2LMHeadModel"),
    _lm("gpt_bigcode", "GPTBigCodeForCausalLM"),
    _lm("gptj", "GPTJForCausalLM", rotary_dim=4),
    _lm("gpt_neo", "GPTNeoForCausalLM", attention_types=[[["global", "local"], 1]]),
    _lm("gpt_neox", "GPTNeoXForCausalLM"),
    _lm("codegen", "CodeGenForCausalLM", rotary_dim=4),
    _lm("falcon", "FalconForCausalLM"),
    _lm("bloom", "BloomForCausalLM"),
    _lm("mpt", "MptForCausalLM"),
    _lm("opt", "OPTForCausalLM", ffn_dim=48, word_embed_proj_dim=32),
    # mixture of experts
    _moe("mixtral", "MixtralForCausalLM", num_key_value_heads=2),
    _moe("qwen2_moe", "Qwen2MoeForCausalLM", num_key_value_heads=2),
    _moe("qwen3_moe", "Qwen3MoeForCausalLM", num_key_value_heads=2, head_dim=8),
    _moe("deepseek_v2", "DeepseekV2ForCausalLM", n_routed_experts=4, n_shared_experts=1, first_k_dense_replace=0,
         kv_lora_rank=16, q_lora_rank=None, qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=8, n_group=1,
         topk_group=1),
    _moe("olmoe", "OlmoeForCausalLM"),
    # encoder-decoders
    ZooEntry("t5", "T5ForConditionalGeneration", dict(d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4,
                                                        decoder_start_token_id=0), "seq2seq", True,
             base_keys=("vocab_size", "pad_token_id", "eos_token_id")),
    _s2s("bart", "BartForConditionalGeneration"),
    _s2s("mbart", "MBartForConditionalGeneration"),
    _s2s("pegasus", "PegasusForConditionalGeneration"),
    _s2s("marian", "MarianMTModel"),
    ZooEntry("whisper", "WhisperForConditionalGeneration",
             dict(d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
                  encoder_ffn_dim=48, decoder_ffn_dim=48, num_mel_bins=8, max_source_positions=32,
                  max_target_positions=32, decoder_start_token_id=2), "whisper", True,
             base_keys=("vocab_size", "pad_token_id", "bos_token_id", "eos_token_id")),
    # encoders
    _cls("bert", "BertForSequenceClassification"),
    _cls("roberta", "RobertaForSequenceClassification"),
    _cls("xlm-roberta", "XLMRobertaForSequenceClassification"),
    _cls("electra", "ElectraForSequenceClassification", embedding_size=32),
    _cls("distilbert", "DistilBertForSequenceClassification", dim=32, n_layers=2, n_heads=4, hidden_dim=48),
    _cls("albert", "AlbertForSequenceClassification", embedding_size=16),
    _cls("deberta-v2", "DebertaV2ForSequenceClassification"),
    _cls("mpnet", "MPNetForSequenceClassification"),
    _cls("modernbert", "ModernBertForSequenceClassification"),
    # vision
    ZooEntry("vit", "ViTForImageClassification", _VISION, "image"),
    ZooEntry("clip_vision_model", "CLIPVisionModel", _VISION, "image"),
    # speech
    ZooEntry("wav2vec2", "Wav2Vec2ForSequenceClassification",
             dict(conv_dim=(16, 16), conv_stride=(5, 4), conv_kernel=(10, 8), num_conv_pos_embeddings=16,
                  num_conv_pos_embedding_groups=2, num_labels=3), "audio",
             base_keys=("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                        "intermediate_size")),
]}
