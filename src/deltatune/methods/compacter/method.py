"""How Compacter attaches: bottleneck placement, one shared slow-weight tensor per adapter."""

from __future__ import annotations

from torch import nn

from deltatune.core.layer import adapter_dtype
from deltatune.errors import ConfigError
from deltatune.methods.adapters.layer import reference_weight
from deltatune.methods.adapters.method import BottleneckMethod, Site
from deltatune.methods.compacter.config import CompacterConfig
from deltatune.methods.compacter.layer import CompacterLayer
from deltatune.methods.compacter.phm import PHMBottleneck, init_rule


class CompacterMethod(BottleneckMethod):
    """Registered for ``"compacter"``."""

    layer_cls = CompacterLayer

    def site(self, model: nn.Module, path: str, config: CompacterConfig) -> Site:
        site = super().site(model, path, config)
        n = config.phm_dim
        bad = [f"{what} {size}" for what, size in (("input size", site.in_features), ("bottleneck", site.width),
                                                     ("output size", site.out_features)) if size % n]
        if bad:
            raise ConfigError(f"{path}: Compacter needs sizes divisible by phm_dim={n}, but the {', '.join(bad)} "
                              f"is not; set bottleneck= to a multiple of {n} or change phm_dim")
        return site

    def add_adapters(self, sites: list[tuple[Site, CompacterLayer]], config: CompacterConfig, name: str) -> None:
        if not sites:
            return
        first = reference_weight(sites[0][0].module)
        rule = nn.Parameter(init_rule(config.phm_dim, device=first.device).to(adapter_dtype(first)))
        for i, (site, layer) in enumerate(sites):
            weight = reference_weight(site.module)
            block = PHMBottleneck(site.in_features, site.width, site.out_features, config.phm_dim, config.phm_rank,
                                  config.activation, device=weight.device, dtype=adapter_dtype(weight))
            layer.add_compacter(name, block, rule, site.placement, config.scaling, owner=i == 0)
