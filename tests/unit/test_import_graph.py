"""No import circle in cacheproxy/: every module's imports (type-only ones included) point one way."""

from __future__ import annotations

import ast
from pathlib import Path

import cacheproxy

ROOT = Path(cacheproxy.__file__).parent


def _module_name(path: Path) -> str:
    parts = ["cacheproxy", *path.relative_to(ROOT).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """module -> the cacheproxy modules it imports, at any level of the file (inside TYPE_CHECKING and functions
    too: a circle typed only is still a circle in the design)."""
    modules = {_module_name(path): path for path in ROOT.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module is not None and node.level == 0:
                for alias in node.names:
                    submodule = f"{node.module}.{alias.name}"
                    targets.add(submodule if submodule in modules else node.module)
        graph[name] = {t for t in targets if t in modules and t != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph[node]):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_graph_sees_imports() -> None:
    graph = import_graph()
    assert "cacheproxy.proxy.session" in graph["cacheproxy.proxy.server"]
    assert "cacheproxy.errors" in graph["cacheproxy.protocol.framing"]


def test_the_cycle_finder_finds_a_circle() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_circle_in_cacheproxy() -> None:
    assert cycles(import_graph()) == []


def test_the_core_does_not_import_the_asyncio_layers() -> None:
    """protocol/, cache/, analysis/, policy/ and catalog/ are sans-IO: they never import proxy/ or feeds/."""
    graph = import_graph()
    core = ("cacheproxy.protocol", "cacheproxy.cache", "cacheproxy.analysis", "cacheproxy.policy", "cacheproxy.catalog")
    outer = ("cacheproxy.proxy", "cacheproxy.feeds", "cacheproxy.app", "cacheproxy.upstream")
    wrong = {
        (module, target)
        for module, targets in graph.items()
        if module.startswith(core)
        for target in targets
        if target.startswith(outer)
    }
    assert wrong == set()


def test_the_protocol_neutral_core_knows_no_wire_protocol() -> None:
    """cache/, policy/ and analysis/ are shared by every wire protocol (PostgreSQL's today, MySQL's next): they never
    import protocol/ (PostgreSQL v3)."""
    graph = import_graph()
    neutral = ("cacheproxy.cache", "cacheproxy.policy", "cacheproxy.analysis")
    wrong = {
        (module, target)
        for module, targets in graph.items()
        if module.startswith(neutral)
        for target in targets
        if target.startswith("cacheproxy.protocol")
    }
    assert wrong == set()
