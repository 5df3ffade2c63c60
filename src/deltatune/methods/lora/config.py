"""LoRA configuration (Hu et al. 2021), stored with HF PEFT's field names."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

from deltatune.core.config import (TargetedConfig, fraction, module_names, one_of, positive_int, positive_number,
                                   require)
from deltatune.core.patterns import compile_pattern, tail_pattern
from deltatune.methods.lora.init import is_data_init

_BIAS = ("none", "all", "lora_only")
_INIT = ("kaiming", "gaussian", "random", "pissa", "olora", "pissa_niter_<K>")
# our spelling -> PEFT's init_lora_weights value (the others are spelled the same)
_INIT_TO_PEFT = {"kaiming": True, "random": False}


@dataclass(frozen=True)
class LoraConfig(TargetedConfig):
    """Low-rank update ``h = W x + scale * B A x`` with ``scale = alpha / r``.

    Attributes:
        r: rank of the update.
        alpha: scaling numerator; the update is multiplied by ``alpha / r``
            (``alpha / sqrt(r)`` with ``use_rslora``).
        dropout: dropout probability on the LoRA path's input.
        targets: modules to adapt: names or name suffixes (``["query", "value"]``), component
            aliases (``["q", "v"]``, resolved per architecture; see docs/models.md), a regex
            string matched against whole module paths, ``"attention"``, ``"mlp"`` or
            ``"all-linear"``. ``None`` means ``["q", "v"]``. On MoE models whose experts are
            fused 3-D weights (Mixtral, Qwen3-MoE...), ``up``/``down``/``gate`` also adapt those.
        target_parameters: fused expert weights to adapt by name, as in peft
            (``["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]``).
        layers: restrict to blocks: a list of indices, or ``"lower"``, ``"upper"``, ``"even"``,
            ``"odd"``, ``"all"``.
        exclude: names (suffixes) or a regex of modules to leave alone.
        bias: which base biases train too: ``"none"``, ``"all"`` or ``"lora_only"``.
        init: ``"kaiming"`` (A Kaiming-uniform, B zero: starts as the base model),
            ``"gaussian"`` (A ~ N(0, 1/r), B zero), ``"random"`` (both random; for tests),
            ``"pissa"`` (the top-r singular vectors of W; ``"pissa_niter_K"``: a randomized SVD
            with K iterations, fast on large layers) or ``"olora"`` (QR of W). PiSSA and OLoRA
            train the principal part of W with the rest frozen, and are saved converted to a
            plain LoRA of rank 2r on the original weights (Linear and Conv1D layers only).
        use_rslora: rank-stabilised scaling ``alpha / sqrt(r)`` (Kalajdzievski 2023).
        dora: weight-decomposed LoRA (DoRA, Liu et al. 2024): a learned magnitude per output
            feature times the direction of ``W + scale * B A`` (PEFT's ``use_dora``). Linear,
            GPT-2 Conv1D and Embedding layers only.
        rank_pattern: per-module rank, ``{regex: r}``; the regex matches a path's tail.
        alpha_pattern: per-module alpha, ``{regex: alpha}``.
    """

    method = "lora"
    peft_type = "LORA"
    peft_names = {"alpha": "lora_alpha", "dropout": "lora_dropout", "targets": "target_modules",
                  "layers": "layers_to_transform", "exclude": "exclude_modules", "init": "init_lora_weights",
                  "dora": "use_dora"}
    peft_unsupported = frozenset({
        "lora_bias", "layer_replication", "trainable_token_indices",
        "alora_invocation_tokens", "use_qalora", "use_bdlora", "arrow_config", "eva_config", "corda_config",
    })

    target_words = ("all-linear",)

    r: int = 8
    alpha: float = 8
    dropout: float = 0.0
    bias: str = "none"
    init: str | bool = "kaiming"
    use_rslora: bool = False
    dora: bool = False
    rank_pattern: dict = field(default_factory=dict)
    alpha_pattern: dict = field(default_factory=dict)
    target_parameters: Sequence[str] | None = None

    def validate(self) -> None:
        super().validate()
        if isinstance(self.init, bool):  # PEFT's spelling, from a file
            object.__setattr__(self, "init", "kaiming" if self.init else "random")
        positive_int("r", self.r, hint="the rank of the update")
        positive_number("alpha", self.alpha)
        fraction("dropout", self.dropout)
        module_names("target_parameters", self.target_parameters, regex=False, empty=True)
        if self.target_parameters and self.targets is None:  # peft: parameters only, no default modules
            object.__setattr__(self, "targets", ())
        one_of("bias", self.bias, _BIAS)
        require(isinstance(self.init, str) and (self.init in _INIT or is_data_init(self.init)), "init", self.init,
                f"one of {_INIT}")
        require(isinstance(self.dora, bool), "dora", self.dora, "true or false")
        for key, value in self.rank_pattern.items():
            compile_pattern(f"rank_pattern key {key!r}", tail_pattern(key) if isinstance(key, str) else key)
            positive_int(f"rank_pattern[{key!r}]", value)
        for key, value in self.alpha_pattern.items():
            compile_pattern(f"alpha_pattern key {key!r}", tail_pattern(key) if isinstance(key, str) else key)
            positive_number(f"alpha_pattern[{key!r}]", value)

    def targets_may_be_empty(self) -> bool:
        return bool(self.target_parameters)

    def to_dict(self) -> dict:
        out = super().to_dict()
        out["init_lora_weights"] = _INIT_TO_PEFT.get(self.init, self.init)
        return out
