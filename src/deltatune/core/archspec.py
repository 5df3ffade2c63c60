"""Per-architecture facts: where the transformer blocks are and what the component aliases
(q k v o up down gate) mean.

An alias resolves for each module (or fused expert parameter) inside a block from its path *relative
to the block*, e.g. ``attention.self.query`` inside ``bert.encoder.layer.3``: first a family's own
table, when one is registered (:func:`register_family`), then the structural spelling rules shared
by every family (:data:`SPELLINGS`, extended with :func:`register_spelling`). A fused projection
(GPT-2's ``c_attn``, Phi-3's ``qkv_proj``, ``gate_up_proj``) carries every alias it computes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Iterable

from torch import nn

from deltatune.core.archspec_diffusers import FAMILIES as DIFFUSERS_FAMILIES, diffusers_family

COMPONENTS = ("q", "k", "v", "o", "up", "down", "gate")
#: alias groups: each stands for the components it lists
GROUPS = {"attention": ("q", "k", "v", "o"), "mlp": ("up", "down", "gate")}

# The first ".layer.N." / ".layers.N." / ".h.N." / ".block.N." segment splits a path into
# stack (which tower), block index, and the path inside the block.
_GENERIC_BLOCK = (r"(?P<stack>(?:.*?\.)?(?:layers|layer|h|block|blocks|albert_layers))\.(?P<index>\d+)"
                  r"\.(?P<rest>.+)")

# Structural spelling rules, tried in order against the path inside a block; the first rule whose
# pattern matches the end of the path (whole segments) decides its components. Spellings that mean
# different things in attention and in the MLP (dense, c_proj, Wo, single letters) need a segment
# naming attention above them (attn, attention, self_attention, SelfAttention, EncDecAttention,
# encoder_attn, ...), which covers self- and cross-attention alike.
_IN_ATTENTION = r"(?:.*\.)?\w*(?:att|Att|ATT)\w*\.(?:.*\.)?"
SPELLINGS: list[tuple[str, frozenset[str]]] = [
    (rf"{_IN_ATTENTION}(?:q|query)", frozenset("q")),
    (rf"{_IN_ATTENTION}(?:k|key)", frozenset("k")),
    (rf"{_IN_ATTENTION}(?:v|value)", frozenset("v")),
    (rf"{_IN_ATTENTION}(?:o|dense|c_proj|Wo|wo|out|output\.dense)", frozenset("o")),
    (r"c_attn|query_key_value|Wqkv|qkv_proj|qkv|in_proj", frozenset("qkv")),
    (r"kv_a_proj_with_mqa|kv_b_proj|kv_proj", frozenset("kv")),
    (r"q_proj|q_a_proj|q_b_proj|query|query_proj|q_lin", frozenset("q")),
    (r"k_proj|key|key_proj|k_lin", frozenset("k")),
    (r"v_proj|value|value_proj|v_lin", frozenset("v")),
    (r"o_proj|out_proj|out_lin", frozenset("o")),
    (r"gate_up_proj|Wi", frozenset({"up", "gate"})),
    (r"up_proj|c_fc|fc_in|fc1|dense_h_to_4h|lin1|intermediate\.dense|intermediate_dense|wi|wi_1|ffn|w3",
     frozenset({"up"})),
    (r"down_proj|c_proj|fc_out|fc2|dense_4h_to_h|lin2|output\.dense|output_dense|wo|Wo|ffn_output|w2",
     frozenset({"down"})),
    (r"gate_proj|wi_0|w1", frozenset({"gate"})),
]


def register_spelling(pattern: str, components: Iterable[str], *, first: bool = True) -> None:
    """Teach every family a spelling: ``pattern`` (a regex over the end of a path inside a block,
    whole segments) means ``components``. ``first`` puts it ahead of the built-in rules."""
    chosen = frozenset(components)
    unknown = sorted(chosen - set(COMPONENTS))
    if unknown or not chosen:
        raise ValueError(f"components must be a non-empty subset of {COMPONENTS}; got {sorted(chosen)}")
    re.compile(pattern)
    rule = (pattern, chosen)
    if first:
        SPELLINGS.insert(0, rule)
    else:
        SPELLINGS.append(rule)


def spelled_components(path_in_block: str) -> frozenset[str]:
    """The components the structural rules give a path inside a block (empty when none)."""
    for pattern, components in SPELLINGS:
        if re.fullmatch(rf"(?:.*\.)?(?:{pattern})", path_in_block):
            return components
    return frozenset()


@dataclass(frozen=True)
class ArchSpec:
    """How one model family names its blocks and sub-modules.

    ``components`` maps an alias to a regex matched against the whole path inside a block; a
    family lists only what the structural rules get wrong or miss for it.
    """

    name: str
    components: dict[str, str] = field(default_factory=dict)
    block_pattern: str = _GENERIC_BLOCK

    def split(self, path: str) -> tuple[str, int, str] | None:
        """``(stack, block_index, path_in_block)`` for a module inside a block, else None."""
        m = re.fullmatch(self.block_pattern, path)
        if not m:
            return None
        return m.group("stack"), int(m.group("index")), m.group("rest")

    def components_of(self, path_in_block: str) -> frozenset[str]:
        """The aliases a path inside a block answers to: the family's table when it has an
        entry for the path, else the structural spelling rules."""
        own = frozenset(c for c, rx in self.components.items() if re.fullmatch(rx, path_in_block))
        return own or spelled_components(path_in_block)


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

# Families without a table of their own: the structural rules alone.
_GENERIC = ArchSpec("generic")


def register_family(key: str, components: dict[str, str] | None = None, *,
                    block_pattern: str | None = None) -> ArchSpec:
    """Register a family's facts under ``key``: a transformers ``config.model_type`` or, for
    models without one (e.g. diffusers), the model's class name. ``components`` maps aliases to
    regexes over the whole path inside a block; ``block_pattern`` is a regex with the groups
    ``stack``, ``index`` and ``rest`` (default: ``...layers.N...``, ``.h.N.``, ``.block.N.``)."""
    components = dict(components or {})
    unknown = sorted(set(components) - set(COMPONENTS))
    if unknown:
        raise ValueError(f"unknown component aliases {unknown}; the aliases are {COMPONENTS}")
    for rx in [*components.values(), block_pattern or ""]:
        re.compile(rx)
    spec = ArchSpec(key, components, block_pattern or _GENERIC_BLOCK)
    SPECS[key] = spec
    return spec


def spec_for(model: nn.Module) -> ArchSpec:
    """The :class:`ArchSpec` of a model, by ``config.model_type`` then class name (a generic one
    for unregistered families)."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type is None and (family := diffusers_family(model)):
        return ArchSpec(family, *DIFFUSERS_FAMILIES[family])
    return SPECS.get(model_type) or SPECS.get(type(model).__name__) or _GENERIC


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


def head_names(model: nn.Module) -> set[str]:
    """Paths of every head, output and classification: what "all-linear", BitFit's "all" and
    quantization leave alone."""
    return output_head_names(model) | set(classification_head_names(model))


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
