"""(IA)^3 configuration (Liu et al. 2022), stored with HF PEFT's field names."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from deltatune.core.config import TargetedConfig, module_names, one_of

_INIT = ("ones", "random")
# our spelling -> PEFT's init_ia3_weights value
_INIT_TO_PEFT = {"ones": True, "random": False}


@dataclass(frozen=True)
class IA3Config(TargetedConfig):
    """Learned vectors that rescale activations: ``h = l * (W x + b)`` for most targets, and
    ``h = W (l * x) + b`` for the feed-forward ones (Liu et al. 2022, "(IA)^3").

    The vectors start at one (the model starts as the base model) and can be merged into the
    weights, since each is a per-row or per-column scale of ``W``.

    Attributes:
        targets: modules whose output (or, for ``feedforward`` ones, input) is rescaled: names or
            name suffixes, component aliases (``"k"``, ``"v"``, ``"down"`` ...), a regex string
            matched against whole paths, or ``"all-linear"``. ``None`` means ``["k", "v", "down"]``,
            the paper's choice.
        feedforward: which of the targeted modules get their *input* rescaled (one scale per input
            feature) instead of their output. Same syntax as ``targets``; ``None`` means the
            feed-forward down projection (``"down"``) where it is targeted; ``[]`` means none.
        layers: restrict to blocks: a list of indices, or ``"lower"``, ``"upper"``, ``"even"``,
            ``"odd"``, ``"all"``.
        exclude: names (suffixes) or a regex of modules to leave alone.
        init: ``"ones"`` (identity at the start) or ``"random"`` (standard normal; for tests).
    """

    method = "ia3"
    peft_type = "IA3"
    peft_names = {"targets": "target_modules", "feedforward": "feedforward_modules",
                  "exclude": "exclude_modules", "init": "init_ia3_weights"}

    feedforward: str | Sequence[str] | None = None
    init: str | bool = "ones"

    def validate(self) -> None:
        super().validate()
        if isinstance(self.init, bool):  # PEFT's spelling, from a file
            object.__setattr__(self, "init", "ones" if self.init else "random")
        one_of("init", self.init, _INIT)
        module_names("feedforward", self.feedforward, empty=True)

    def to_dict(self) -> dict:
        out = super().to_dict()
        out["init_ia3_weights"] = _INIT_TO_PEFT[self.init]
        if out.get("layers") is None:  # PEFT's IA3 has no layer selection; saved configs never need one
            out.pop("layers", None)
        return out
