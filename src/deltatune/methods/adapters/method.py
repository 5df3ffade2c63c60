"""How bottleneck methods attach: find the placement, check every site, then wrap and add."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from deltatune.core.layer import adapter_dtype
from deltatune.core.wrapping import unwrapped_target, wrapped
from deltatune.core.registry import Method
from deltatune.methods.adapters.config import AdapterConfig, BottleneckConfig
from deltatune.methods.adapters.layer import Bottleneck, BottleneckLayer, reference_weight
from deltatune.methods.adapters.placement import adapter_dims, adapter_paths, placement_of


@dataclass(frozen=True)
class Site:
    """One module that gets an adapter: where, how it connects, and the adapter's widths."""

    path: str
    module: nn.Module  # the user's module (inside its wrapper, if it has one already)
    placement: str
    in_features: int
    out_features: int
    width: int


class BottleneckMethod(Method):
    """Registered for ``"adapters"``; subclasses (Compacter) choose the wrapper class and the block."""

    layer_cls: type[BottleneckLayer] = BottleneckLayer

    def inject(self, model: nn.Module, config: BottleneckConfig, name: str) -> list[str]:
        paths = adapter_paths(model, config)
        # check every site before wrapping any, so a bad config leaves the model untouched
        sites = [self.site(model, path, config) for path in paths]
        layers = [wrapped(model, site.path, self.layer_cls, config.method, exact=True) for site in sites]
        self.add_adapters(list(zip(sites, layers)), config, name)
        return paths

    def site(self, model: nn.Module, path: str, config: BottleneckConfig) -> Site:
        """The :class:`Site` at ``path``; raises :class:`TargetError` where no adapter can go."""
        # exact: a CompacterLayer is a BottleneckLayer, yet cannot run plain bottleneck blocks
        module = unwrapped_target(model.get_submodule(path), path, self.layer_cls, config.method, exact=True)
        placement = placement_of(module, config.style)
        d_in, d_out = adapter_dims(module, placement, path)
        return Site(path, module, placement, d_in, d_out, config.width(d_out))

    def add_adapters(self, sites: list[tuple[Site, BottleneckLayer]], config: BottleneckConfig, name: str) -> None:
        """Add adapter ``name`` to every wrapped site."""
        for site, layer in sites:
            weight = reference_weight(site.module)
            block = self.block(site, config, device=weight.device, dtype=adapter_dtype(weight))
            layer.add_adapter(name, block, site.placement, config.scaling)

    def block(self, site: Site, config: BottleneckConfig, *, device, dtype) -> nn.Module:
        """The module computing the adapter's change at ``site`` (before scaling)."""
        assert isinstance(config, AdapterConfig)
        return Bottleneck(site.in_features, site.width, site.out_features, config.activation, config.init,
                          device=device, dtype=dtype)
