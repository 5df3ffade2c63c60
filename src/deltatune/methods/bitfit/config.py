"""BitFit configuration (Ben Zaken et al. 2021): train only bias terms. HF PEFT has no such
method, so files name it with deltatune's own ``deltatune_method`` key."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from deltatune.core.config import TargetedConfig, require


@dataclass(frozen=True)
class BitFitConfig(TargetedConfig):
    """Train a delta on selected bias terms and nothing else; the base biases stay untouched.

    Attributes:
        targets: modules whose bias trains: ``"all"`` (every Linear and GPT-2 Conv1D that has a
            bias, except the output and classification heads), names or name suffixes,
            component aliases (``["q", "up"]``), or a regex string matched against whole paths.
            Modules without a bias (``bias=None``, as in LLaMA) are skipped.
        layer_norms: also train every LayerNorm bias (in the selected ``layers``, minus
            ``exclude``), whatever ``targets`` says. On by default, as in the paper, where
            "all biases" includes the LayerNorm ones.
        layers: restrict to blocks: a list of indices, or ``"lower"``, ``"upper"``, ``"even"``,
            ``"odd"``, ``"all"``. Modules outside the blocks (embeddings, pooler) then drop out.
        exclude: names (suffixes) or a regex of modules to leave alone.
    """

    method = "bitfit"
    peft_type = None

    target_words = ("all",)

    targets: str | Sequence[str] = "all"
    layer_norms: bool = True

    def validate(self) -> None:
        super().validate()
        require(isinstance(self.layer_norms, bool), "layer_norms", self.layer_norms, "True or False")

    def exact_targets(self, targets: list[str]) -> dict:
        # the exact list already holds the chosen LayerNorms; adding all of them again on load
        # would pick up ones outside the original layer selection
        return {**super().exact_targets(targets), "layer_norms": False}
