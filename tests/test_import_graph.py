"""The package's subpackages form a layered graph: no import cycle between them. Every import counts: inside
functions, and in `if TYPE_CHECKING:` blocks too (naming another unit's types is depending on it)."""

from __future__ import annotations

import ast
from pathlib import Path

import tailclip

PACKAGE = Path(tailclip.__file__).parent


def _unit(module: str) -> str:
    """Subpackage or top-level module a module belongs to (tailclip.engine.trainer -> tailclip.engine)."""
    return ".".join(module.split(".")[:2])


def _imports(path: Path, module: str) -> set[str]:
    tree = ast.parse(path.read_text())
    base = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                parent = base[: len(base) - (node.level - 1)]
                target = ".".join(parent + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found |= {target} if node.module else {f"{target}.{a.name}" for a in node.names}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
    return {t for t in found if t.startswith("tailclip.")}


def import_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        module = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        src = _unit(module)
        for target in _imports(path, module):
            dst = _unit(target)
            if dst != src and dst != "tailclip.__version__":
                graph.setdefault(src, set()).add(dst)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as a path [a, b, ..., a], or None (depth-first search with colours)."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = 2
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_finder_sees_a_cycle() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}}) is None


def test_no_import_cycle_between_subpackages() -> None:
    graph = import_graph()
    assert "tailclip.methods" in graph and "tailclip.engine" in graph  # the scan found the package
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph) or [])


def test_layers() -> None:
    graph = import_graph()
    assert "tailclip.methods" not in graph.get("tailclip.config", set())
    assert "tailclip.data" not in graph.get("tailclip.synthetic", set())
    for low in ("tailclip.backbones", "tailclip.data", "tailclip.engine", "tailclip.features"):
        assert "tailclip.api" not in graph.get(low, set()), f"{low} imports the orchestrator"
    # the method contract sits below both sides of it; the engine drives methods only through it
    assert not {"tailclip.engine", "tailclip.methods", "tailclip.api"} & graph["tailclip.contract"]
    assert "tailclip.methods" not in graph["tailclip.engine"]
    assert not {"tailclip.engine", "tailclip.contract", "tailclip.methods"} & graph["tailclip.features"]
    assert graph.get("tailclip.runtime", set()) <= {"tailclip.errors"}  # device and processes: the bottom
