"""Imports flow one way (DESIGN.md): core <- methods <- compose/quant <- train/serve <- experiments
<- cli, peers never import each other, nothing imports the ``deltatune`` facade, and no modules
import each other in a circle. Every import counts, those inside functions too; imports under
``if TYPE_CHECKING:`` count for the direction (they name a dependency) but not for cycles (they
never run)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "deltatune"

#: the layer of each part of the package; a module may import its own part and lower layers only
LAYERS = {
    "errors": 0, "version": 0,
    "core": 1,
    "methods": 2,
    "compose": 3, "quant": 3, "api": 3,
    "train": 4, "serve": 4,
    "experiments": 5,
    "cli": 6, "__main__": 7,
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _part(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""  # "" is the facade, deltatune/__init__.py


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(module: str) -> list[tuple[str, int, bool]]:
    """``(imported deltatune module, line, runs)`` for every import statement in ``module``."""
    path = MODULES[module]
    tree = ast.parse(path.read_text(), str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: list[tuple[str, int, bool]] = []

    def visit(node: ast.AST, runs: bool) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.body:
                visit(child, False)
            for child in node.orelse:
                visit(child, runs)
            return
        if isinstance(node, ast.Import):
            found.extend((a.name, node.lineno, runs) for a in node.names if a.name.split(".")[0] == "deltatune")
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            if base.split(".")[0] == "deltatune":
                for alias in node.names:  # "from deltatune.core import registry" imports a module
                    sub = f"{base}.{alias.name}"
                    found.append((sub if sub in MODULES else base, node.lineno, runs))
        for child in ast.iter_child_nodes(node):
            visit(child, runs)

    visit(tree, True)
    return found


def _owner(module: str) -> str:
    """The module an import statement actually loads code from (a name inside a module resolves
    to that module; a name the import machinery cannot place to its closest module)."""
    while module not in MODULES and "." in module:
        module = module.rpartition(".")[0]
    return module


def test_every_part_has_a_layer():
    assert {_part(m) for m in MODULES} - {""} <= set(LAYERS), "add new packages to LAYERS"


def test_imports_flow_down_the_layers_and_never_through_the_facade():
    wrong = []
    for module in MODULES:
        own = _part(module)
        if own == "":
            continue  # the facade re-exports everything
        for target, line, _ in _imports(module):
            other = _part(_owner(target))
            if other == "":
                wrong.append(f"{module}:{line} imports the deltatune facade; import the module that defines it")
            elif other != own and LAYERS[other] >= LAYERS[own]:
                wrong.append(f"{module}:{line} ({own}, layer {LAYERS[own]}) imports {target} "
                             f"({other}, layer {LAYERS[other]})")
    assert not wrong, "\n".join(wrong)


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_no_module_imports_itself_through_others():
    # package __init__ files re-export their modules, so an edge to a package is one to its
    # __init__ only; its own imports of submodules are edges too
    graph = {m: {_owner(t) for t, _, runs in _imports(m) if runs and _owner(t) != m} for m in MODULES}
    graph = {m: {t for t in targets if t != "deltatune"} for m, targets in graph.items() if m != "deltatune"}
    cycle = _cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_checker_sees_lazy_and_relative_imports(tmp_path):
    probe = "deltatune.core.zz_probe"
    MODULES[probe] = tmp_path / "zz_probe.py"
    MODULES[probe].write_text("def f():\n    from deltatune.compose import combine\n    from .. import train\n")
    try:
        assert [(t, line) for t, line, _ in _imports(probe)] == [("deltatune.compose.combine", 2),
                                                                  ("deltatune.train", 3)]
        with pytest.raises(AssertionError, match="zz_probe:2"):
            test_imports_flow_down_the_layers_and_never_through_the_facade()
    finally:
        del MODULES[probe]
