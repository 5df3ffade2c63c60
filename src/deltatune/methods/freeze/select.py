"""Which modules a ``train`` selection names: blocks, embeddings, the head, or every top-level part."""

from __future__ import annotations

from torch import nn

from deltatune.core.archspec import classification_head_names, output_head_names, spec_for
from deltatune.core.targets import visible_modules
from deltatune.errors import TargetError
from deltatune.methods.freeze.config import parse_train


def _block_of(spec, path: str) -> tuple[str, int] | None:
    """``(stack, index)`` when ``path`` is a transformer block itself (``bert.encoder.layer.3``).

    ``ArchSpec.split`` only matches paths *inside* a block, hence the placeholder child.
    """
    split = spec.split(path + ".-")
    return (split[0], split[1]) if split and split[2] == "-" else None


def blocks(model: nn.Module) -> dict[str, list[tuple[int, str]]]:
    """``stack -> [(index, path), ...]`` for every transformer block, in model order."""
    spec = spec_for(model)
    out: dict[str, list[tuple[int, str]]] = {}
    for path in visible_modules(model):
        found = _block_of(spec, path)
        if found:
            out.setdefault(found[0], []).append((found[1], path))
    return out


def _outside_blocks(spec, path: str) -> bool:
    return spec.split(path) is None and _block_of(spec, path) is None


def _embeddings(model: nn.Module, modules: dict[str, nn.Module]) -> list[str]:
    spec = spec_for(model)
    outside = [p for p in modules if _outside_blocks(spec, p)]
    # BERT-style models keep word, position and type embeddings and a LayerNorm in one module
    chosen = [p for p in outside if p.rsplit(".", 1)[-1] == "embeddings"]
    if not chosen:
        chosen = [p for p in outside if isinstance(modules[p], nn.Embedding)]
    if not chosen:
        raise TargetError(f"found no embeddings outside the transformer blocks of {type(model).__name__}")
    return chosen


def _head(model: nn.Module) -> list[str]:
    heads = classification_head_names(model) or sorted(output_head_names(model))
    if not heads:
        raise TargetError(f"{type(model).__name__} has no classification or output head to train")
    return heads


def _top_level(model: nn.Module) -> list[str]:
    return [name for name, child in model.named_children() if any(True for _ in child.parameters())]


def _chosen_blocks(model: nn.Module, item: int | str) -> list[str]:
    stacks = blocks(model)
    if not stacks:
        raise TargetError(f"found no transformer blocks in {type(model).__name__}")
    if isinstance(item, int):
        hits = [path for found in stacks.values() for i, path in found if i == item]
        if not hits:
            biggest = max(len(found) for found in stacks.values())
            raise TargetError(f"block {item} does not exist: the model's blocks are numbered 0..{biggest - 1}")
        return hits
    end, count = item.split(":")
    out: list[str] = []
    for stack, found in stacks.items():
        if int(count) > len(found):
            raise TargetError(f"{item!r} asks for {count} blocks but {stack} has {len(found)}")
        ordered = sorted(found)
        out += [path for _, path in (ordered[-int(count):] if end == "upper" else ordered[:int(count)])]
    return out


def train_paths(model: nn.Module, train) -> list[str]:
    """Paths of the modules ``train`` selects (see :class:`~deltatune.methods.freeze.FreezeConfig`),
    in model order, none inside another."""
    modules = visible_modules(model)
    chosen: set[str] = set()
    for item in parse_train(train):
        if item == "embeddings":
            chosen.update(_embeddings(model, modules))
        elif item == "head":
            chosen.update(_head(model))
        elif item == "all":
            chosen.update(_top_level(model))
        else:
            chosen.update(_chosen_blocks(model, item))
    outer = {p for p in chosen if not any(p.startswith(q + ".") for q in chosen)}
    return [p for p in modules if p in outer]
