"""Per-architecture facts: where the transformer blocks are and what q/k/v/o/up/down/gate mean.

Component aliases are regexes matched (whole) against a module path *relative to its block*,
e.g. ``attention.self.query`` inside ``bert.encoder.layer.3``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn

from deltatune.core.archspec_diffusers import FAMILIES as DIFFUSERS_FAMILIES, diffusers_family

COMPONENTS = ("q", "k", "v", "o", "up", "down", "gate")

# The first ".layer.N." / ".layers.N." / ".h.N." / ".block.N." segment splits a path into
# stack (which tower), block index, and the path inside the block.
_GENERIC_BLOCK = r"(?P<stack>(?:.*?\.)?(?:layers|layer|h|block|blocks))\.(?P<index>\d+)\.(?P<rest>.+)"


@dataclass(frozen=True)
class ArchSpec:
    """How one model family names its blocks and sub-modules."""

    name: str
    components: dict[str, str]
    block_pattern: str = _GENERIC_BLOCK

    def split(self, path: str) -> tuple[str, int, str] | None:
        """``(stack, block_index, path_in_block)`` for a module inside a block, else None."""
        m = re.fullmatch(self.block_pattern, path)
        if not m:
            return None
        return m.group("stack"), int(m.group("index")), m.group("rest")


_BERT = {
    "q": r"attention\.self\.query", "k": r"attention\.self\.key", "v": r"attention\.self\.value",
    "o": r"attention\.output\.dense", "up": r"intermediate\.dense", "down": r"output\.dense",
}
_GPT2 = {  # GPT-2 fuses q, k and v into one Conv1D: each alias adapts all three
    "q": r"attn\.c_attn", "k": r"attn\.c_attn", "v": r"attn\.c_attn",
    "o": r"attn\.c_proj", "up": r"mlp\.c_fc", "down": r"mlp\.c_proj",
}
_LLAMA = {
    "q": r"self_attn\.q_proj", "k": r"self_attn\.k_proj", "v": r"self_attn\.v_proj",
    "o": r"self_attn\.o_proj", "up": r"mlp\.up_proj", "down": r"mlp\.down_proj",
    "gate": r"mlp\.gate_proj",
}
_T5_ATTN = r"layer\.\d+\.(?:SelfAttention|EncDecAttention)\."
_T5 = {
    "q": _T5_ATTN + "q", "k": _T5_ATTN + "k", "v": _T5_ATTN + "v", "o": _T5_ATTN + "o",
    "up": r"layer\.\d+\.DenseReluDense\.(?:wi|wi_1)", "gate": r"layer\.\d+\.DenseReluDense\.wi_0",
    "down": r"layer\.\d+\.DenseReluDense\.wo",
}

SPECS: dict[str, ArchSpec] = {
    "bert": ArchSpec("bert", _BERT),
    "roberta": ArchSpec("roberta", _BERT),
    "xlm-roberta": ArchSpec("xlm-roberta", _BERT),
    "electra": ArchSpec("electra", _BERT),
    "gpt2": ArchSpec("gpt2", _GPT2),
    "llama": ArchSpec("llama", _LLAMA),
    "mistral": ArchSpec("mistral", _LLAMA),
    "qwen2": ArchSpec("qwen2", _LLAMA),
    "t5": ArchSpec("t5", _T5, r"(?P<stack>(?:.*?\.)?block)\.(?P<index>\d+)\.(?P<rest>.+)"),
}

# Unknown families: an alias means any of the known spellings.
_GENERIC = ArchSpec("generic", {
    c: "|".join(sorted({f"(?:{s.components[c]})" for s in SPECS.values() if c in s.components}))
    for c in COMPONENTS
})


def spec_for(model: nn.Module) -> ArchSpec:
    """The :class:`ArchSpec` of a transformers model (a generic one for unknown families)."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type is None and (family := diffusers_family(model)):
        return ArchSpec(family, *DIFFUSERS_FAMILIES[family])
    return SPECS.get(model_type, _GENERIC)


def output_head_names(model: nn.Module) -> set[str]:
    """Paths of the language-model output head, which "all-linear" must leave alone."""
    heads: set[str] = set()
    get_out = getattr(model, "get_output_embeddings", None)
    out = get_out() if callable(get_out) else None
    if out is not None:
        heads |= {name for name, mod in model.named_modules() if mod is out}
    return heads


def classification_head_names(model: nn.Module) -> list[str]:
    """Top-level head module names of a sequence/token classification model (e.g. ``classifier``)."""
    cls = type(model).__name__
    if not cls.endswith(("ForSequenceClassification", "ForTokenClassification")):
        return []
    return [n for n in ("classifier", "score") if isinstance(getattr(model, n, None), nn.Module)]


def task_type_of(model: nn.Module) -> str | None:
    """PEFT's task_type for a transformers model class, or None."""
    cls = type(model).__name__
    for suffix, task in (("ForSequenceClassification", "SEQ_CLS"), ("ForTokenClassification", "TOKEN_CLS"),
                         ("ForCausalLM", "CAUSAL_LM"), ("LMHeadModel", "CAUSAL_LM"),
                         ("ForConditionalGeneration", "SEQ_2_SEQ_LM"), ("ForSeq2SeqLM", "SEQ_2_SEQ_LM"),
                         ("ForQuestionAnswering", "QUESTION_ANS")):
        if cls.endswith(suffix):
            return task
    return None
