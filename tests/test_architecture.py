"""The import graph, read from the source (``ast``, nothing imported): no import circles, the
shared plumbing (``gateway``) imports no service, the services never import each other, and only
the composition root (``respgw_cli``) imports them all.

For the layers and for circles every ``import`` counts, the ones inside functions and under
``TYPE_CHECKING`` too: a lazy import is still a dependency a reader has to follow. A module that
needs the type of one above it names what it reads of it by a ``typing.Protocol`` of its own (as
``router_svc.running``, ``compaction`` and ``tool_calls`` name the ``Turn`` they read).
"""

from __future__ import annotations

import ast
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SERVICES = ("router_svc", "state_svc", "bootstrap_svc")
ROOT = "respgw_cli"
SHARED = "gateway"
GENERATED = "respgw"
PACKAGES = (ROOT, SHARED, *SERVICES)


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {
        _module_name(path): path
        for package in PACKAGES
        for path in sorted((REPO / package).rglob("*.py"))
    }


MODULES = _modules()


def _is_type_checking(node: ast.AST) -> bool:
    test = node.test if isinstance(node, ast.If) else None
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST, at_load: bool) -> Iterator[tuple[ast.Import | ast.ImportFrom, bool]]:
    """Every import statement under ``tree``, and whether it runs when the module loads (not
    inside a function, not under ``if TYPE_CHECKING``)."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node, at_load
        lazy = isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
        yield from _imports(node, at_load and not lazy and not _is_type_checking(node))


def _imported(name: str, path: Path) -> Iterator[tuple[str, bool]]:
    """The modules ``name`` imports, each with whether it is imported at load: ``from a import
    b`` is ``a.b`` when that is a module of ours, else ``a``; relative imports are resolved
    against ``name``'s package."""
    is_package = path.name == "__init__.py"
    for node, at_load in _imports(ast.parse(path.read_text(), str(path)), True):
        if isinstance(node, ast.Import):
            yield from ((alias.name, at_load) for alias in node.names)
        else:
            base = node.module or ""
            if node.level:
                package = name.split(".")
                package = package if is_package else package[:-1]
                package = package[: len(package) - (node.level - 1)]
                base = ".".join([*package, base] if base else package)
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                yield (sub if sub in MODULES else base), at_load


def _graph(at_load_only: bool) -> dict[str, set[str]]:
    """Module to the modules of ours it imports (a package's ``__init__`` is its own node)."""
    graph: dict[str, set[str]] = {}
    for name, path in MODULES.items():
        targets = set()
        for imported, at_load in _imported(name, path):
            if at_load_only and not at_load:
                continue
            # ``import a.b.c`` loads a, a.b and a.b.c; the deepest one of ours is the dependency.
            parts = imported.split(".")
            for i in range(len(parts), 0, -1):
                candidate = ".".join(parts[:i])
                if candidate in MODULES:
                    if candidate != name:
                        targets.add(candidate)
                    break
        graph[name] = targets
    return graph


GRAPH = _graph(at_load_only=False)
AT_LOAD = _graph(at_load_only=True)


def _top(module: str) -> str:
    return module.split(".")[0]


def test_every_package_of_the_project_is_read() -> None:
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    included = {
        p.rstrip("*") for p in pyproject["tool"]["setuptools"]["packages"]["find"]["include"]
    }
    assert included == {*PACKAGES, GENERATED}
    assert all(p in MODULES for p in PACKAGES)
    # The reader resolves what it reads: a module of ours that imports nothing of ours is rare.
    assert GRAPH["respgw_cli.main"] >= {"gateway.settings", "respgw_cli.local"}
    assert "router_svc.config" in GRAPH["respgw_cli.local"]


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One circle per strongly connected component of more than one module (Tarjan)."""
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
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_no_import_circle_lazy_or_not() -> None:
    assert _cycles(GRAPH) == []


def test_the_import_reader_tells_lazy_imports_apart() -> None:
    assert "state_svc.backends.sqlite" in GRAPH["state_svc.backends"]  # inside a function
    assert "state_svc.backends.sqlite" not in AT_LOAD["state_svc.backends"]
    assert "router_svc.services" in GRAPH["router_svc.running"]  # under TYPE_CHECKING
    assert "router_svc.services" not in AT_LOAD["router_svc.running"]
    assert "router_svc.turn" in AT_LOAD["router_svc.background"]


def test_the_circle_finder_finds_circles() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert _cycles(graph) == [["a", "b", "c"]]


def _arrows(source: str) -> list[tuple[str, str]]:
    return sorted(
        (module, target)
        for module, targets in GRAPH.items()
        if _top(module) == source
        for target in targets
        if _top(target) != source
    )


def test_the_shared_package_imports_no_service_nor_the_composition_root() -> None:
    up = [(m, t) for m, t in _arrows(SHARED) if _top(t) in (*SERVICES, ROOT)]
    assert up == [], "gateway/ is plumbing the services share: move the code up, or invert it"


@pytest.mark.parametrize("service", SERVICES)
def test_a_service_imports_no_other_service_nor_the_composition_root(service: str) -> None:
    across = [(m, t) for m, t in _arrows(service) if _top(t) in (*SERVICES, ROOT)]
    assert across == [], f"{service} depends only on gateway/ and the generated respgw/"


def test_only_the_composition_root_imports_every_service() -> None:
    reached = {_top(t) for _, t in _arrows(ROOT)}
    assert reached >= {SHARED, *SERVICES}


# The modules of the router that name the state service's generated messages: the typed adapter
# (state_client), its records (state_records) and the error mapping (errors, for the ErrorReason
# constants). The workflow modules (turn, background, running, the routes) build and read them
# through state_records only; the set may shrink but not grow.
STATE_PROTO_USERS = {
    "router_svc.state_client",
    "router_svc.state_records",
    "router_svc.errors",
}


def test_only_the_state_adapter_imports_the_state_contract() -> None:
    users = {
        name
        for name, path in MODULES.items()
        if _top(name) == "router_svc"
        and any(
            imported == "respgw.state.v1" or imported.startswith("respgw.state.v1.")
            for imported, _ in _imported(name, path)
        )
    }
    assert users <= STATE_PROTO_USERS, sorted(users - STATE_PROTO_USERS)
    # turn.py and the routes speak to the state service through the adapter only.
    assert "router_svc.state_client" in users and "router_svc.state_records" in users
    assert not any(name == "router_svc.turn" or ".routes." in name for name in users)
