"""Bottleneck adapter configuration (Houlsby et al. 2019, Pfeiffer et al. 2021, He et al. 2021).

HF PEFT has no bottleneck adapters, so files name the method with ``deltatune_method``.
"""

from __future__ import annotations

from dataclasses import dataclass

from deltatune.core.config import TargetedConfig, is_number, one_of, positive_int, positive_number, require

STYLES = ("houlsby", "pfeiffer", "parallel")
ACTIVATION_NAMES = ("relu", "gelu", "silu", "tanh", "identity")
_INITS = ("identity", "near-identity")


@dataclass(frozen=True)
class BottleneckConfig(TargetedConfig):
    """Fields every bottleneck method (adapters, Compacter) shares: where it sits and how wide it is.

    Attributes:
        style: placement. ``"houlsby"``: after the attention output projection and after the
            FFN output projection (component aliases ``o`` and ``down``); ``"pfeiffer"``: after
            the FFN output projection only; ``"parallel"``: beside the FFN block, reading the
            block's input and adding to its output (He et al. 2021).
        reduction_factor: bottleneck width is ``hidden // reduction_factor`` (at least 1).
        bottleneck: the bottleneck width itself; overrides ``reduction_factor``.
        activation: nonlinearity between the projections: ``relu``, ``gelu``, ``silu``,
            ``tanh`` or ``identity``.
        scaling: factor on the adapter's output (He et al. use 4 for parallel adapters).
        targets: overrides the style's placement: names, name suffixes, component aliases or a
            regex, as in LoRA. Sequential styles follow these (linear) layers; ``parallel``
            runs beside these modules.
        layers: restrict to blocks: a list of indices, or ``"lower"``, ``"upper"``, ``"even"``,
            ``"odd"``, ``"all"``.
        exclude: names (suffixes) or a regex of modules to leave alone.
    """

    style: str = "pfeiffer"
    reduction_factor: int | float = 16
    bottleneck: int | None = None
    activation: str = "relu"
    scaling: float = 1.0

    def validate(self) -> None:
        super().validate()
        one_of("style", self.style, STYLES)
        positive_number("reduction_factor", self.reduction_factor, hint="hidden size / bottleneck width")
        positive_int("bottleneck", self.bottleneck, none="then hidden // reduction_factor")
        one_of("activation", self.activation, ACTIVATION_NAMES)
        require(is_number(self.scaling) and self.scaling != 0, "scaling", self.scaling, "a non-zero number")

    def width(self, hidden: int) -> int:
        """The bottleneck width for a layer of size ``hidden``."""
        return self.bottleneck if self.bottleneck is not None else max(1, int(hidden // self.reduction_factor))


@dataclass(frozen=True)
class AdapterConfig(BottleneckConfig):
    """Bottleneck adapters: ``h + scaling * up(act(down(h)))`` after (or beside) a sublayer.

    Adapters are nonlinear, so they cannot be merged into the base weights; ``merge`` raises.

    Attributes:
        init: ``"identity"``: the down projection gets ``nn.Linear``'s default init and the
            up projection is zero, so the model starts exactly as the base model;
            ``"near-identity"``: both projections ~ N(0, 0.01^2) truncated at two standard
            deviations, biases zero (Houlsby et al. 2019).

    (Placement and width: see :class:`BottleneckConfig`.)

    Example::

        dt.AdapterConfig(style="houlsby", reduction_factor=16)
        dt.AdapterConfig(style="parallel", bottleneck=64, scaling=4.0)
    """

    method = "adapters"

    init: str = "identity"

    def validate(self) -> None:
        super().validate()
        one_of("init", self.init, _INITS)
