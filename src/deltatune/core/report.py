"""The human-readable adapter report: one row per adapted module, then the parameter summary."""

from __future__ import annotations

from typing import TYPE_CHECKING

from deltatune.core.targets import alias_map

if TYPE_CHECKING:
    from deltatune.core.model import AdaptedModel


def _shape(t) -> str:
    return "x".join(str(d) for d in t.shape)


def _aliases_by_path(model: "AdaptedModel") -> dict[str, str]:
    """``path -> "q,k,v"``: the component aliases each module answers to."""
    out: dict[str, list[str]] = {}
    for alias, paths in alias_map(model.base_model).items():
        for path in paths:
            out.setdefault(path, []).append(alias)
    return {path: ",".join(aliases) for path, aliases in out.items()}


def format_report(model: "AdaptedModel") -> str:
    rows = [("module", "alias", "adapter", "kind", "shapes", "params")]
    aliases = _aliases_by_path(model)
    for path, layer in model.adapter_layers():
        for name in layer.adapter_names:
            state = layer.adapter_state(name)
            shapes = ", ".join(f"{k.split('.')[0]} {_shape(v)}" for k, v in state.items() if k.count(".") <= 1)
            rows.append((path, aliases.get(path, "-"), name + ("*" if name in layer.active_adapters else ""),
                         type(layer).__name__, shapes, f"{sum(v.numel() for v in state.values()):,}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i < 5 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
             for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    trainable, total = model.parameter_counts()
    lines.append(f"trainable {trainable:,} of {total:,} ({100.0 * trainable / max(total, 1):.2f}%)"
                 f"  active: {', '.join(model.active_adapters) or 'none'}  (* = active)")
    return "\n".join(lines)
