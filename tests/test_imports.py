"""The package's runtime import graph has no cycle.

Every module of ``alsals_fused/`` is parsed (not imported), and each import statement it can run
counts, imports inside functions included: a cycle through a function-level import still means
the two modules cannot be understood (or loaded) one without the other.  Imports under
``if TYPE_CHECKING:`` do not run and do not count.  Importing ``pkg.sub.mod`` also runs the
``__init__`` of every package on the way that the importing module is not itself inside.

``python tests/test_imports.py`` prints the graph.
"""
from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, List, Optional, Set

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "alsals_fused"


def _module_names() -> Dict[str, Path]:
    names = {}
    for path in sorted((ROOT / PACKAGE).rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        names[".".join(parts)] = path
    return names


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _runtime_imports(tree: ast.AST) -> List[ast.stmt]:
    """Import statements outside ``if TYPE_CHECKING:`` bodies (their ``else:`` runs)."""
    found: List[ast.stmt] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def _targets(importer: str, target: str, modules: Dict[str, Path]) -> Set[str]:
    """The modules ``import target`` runs in ``importer``: the target and the packages above it
    that the importer is not inside (those are already being imported when the importer runs)."""
    parts = target.split(".")
    prefixes = (".".join(parts[:i]) for i in range(1, len(parts) + 1))
    return {p for p in prefixes
            if p in modules and p != importer and not (importer + ".").startswith(p + ".")}


def import_graph() -> Dict[str, Set[str]]:
    """{module: the package's modules its import statements run}, by parsing the sources."""
    modules = _module_names()
    graph: Dict[str, Set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets: Set[str] = set()
        for node in _runtime_imports(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    targets |= _targets(name, alias.name, modules)
                continue
            assert isinstance(node, ast.ImportFrom)
            base: Optional[str]
            if node.level:
                anchor = package.split(".")
                if node.level > 1:
                    anchor = anchor[:-(node.level - 1)]
                base = ".".join(anchor + ([node.module] if node.module else []))
            else:
                base = node.module
            if base is None:
                continue
            targets |= _targets(name, base, modules)
            for alias in node.names:          # `from . import host_ext`: a module, not a name
                targets |= _targets(name, f"{base}.{alias.name}", modules)
        graph[name] = targets
    return graph


def find_cycle(graph: Dict[str, Set[str]]) -> Optional[List[str]]:
    state: Dict[str, int] = {}        # 1: on the stack, 2: done
    stack: List[str] = []

    def visit(node: str) -> Optional[List[str]]:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_the_graph_covers_the_package():
    graph = import_graph()
    assert "alsals_fused.optimizer" in graph and "alsals_fused.backends.base" in graph
    assert "alsals_fused.backends.base" in graph["alsals_fused.optimizer"]


def test_no_runtime_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "runtime import cycle: " + " -> ".join(cycle or [])


def test_function_level_imports_count_and_type_checking_ones_do_not():
    tree = ast.parse("from typing import TYPE_CHECKING\n"
                     "if TYPE_CHECKING:\n    from . import a\nelse:\n    from . import b\n"
                     "def f():\n    from . import c\n")
    names = [alias.name for node in _runtime_imports(tree) for alias in node.names]   # type: ignore[attr-defined]
    assert names == ["TYPE_CHECKING", "b", "c"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


if __name__ == "__main__":
    for module, targets in sorted(import_graph().items()):
        short = lambda m: m[len(PACKAGE) + 1:] or PACKAGE   # noqa: E731
        print(f"{short(module)}: {', '.join(sorted(map(short, targets))) or '-'}")
    print("cycle:", find_cycle(import_graph()))
