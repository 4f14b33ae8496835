"""How the package hangs together: no import cycles among lowbit's modules, and `import lowbit` stays
light (the report's optional dependencies load only when a report is rendered)."""

import ast
import subprocess
import sys
from pathlib import Path

import lowbit

PACKAGE = Path(lowbit.__file__).parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _runtime_nodes(node: ast.AST):
    """Every node below `node`, less `if TYPE_CHECKING:` blocks (annotations only, never imported at run time)."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.If) and getattr(child.test, "id", None) == "TYPE_CHECKING":
            continue
        yield child
        yield from _runtime_nodes(child)


def _import_graph() -> dict[str, set[str]]:
    """lowbit module -> the lowbit modules it imports anywhere in its source (function bodies included, so
    a lazy import cannot hide a cycle). `from pkg import name` counts as importing pkg.name where that is
    a module, else pkg itself."""
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges = set()
        for node in _runtime_nodes(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                    base = f"{anchor}.{base}" if base else anchor
                targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
            else:
                continue
            edges |= {t for t in targets if t in modules and t != name}
        graph[name] = edges
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(node):
        state[node], _ = "open", stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        state[node], _ = "done", stack.pop()
        return None

    return next((c for n in sorted(graph) if n not in state and (c := visit(n))), None)


def test_the_graph_reader_sees_imports():
    graph = _import_graph()
    assert {"lowbit.config", "lowbit.ops", "lowbit.fallback", "lowbit.compare"} <= graph["lowbit"]
    assert "lowbit.reference" in graph["lowbit.fallback"] and "lowbit.config" in graph["lowbit.compare.presets"]
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_no_import_cycles():
    cycle = _cycle(_import_graph())
    assert cycle is None, " -> ".join(cycle)


def test_formats_is_a_leaf_and_nothing_below_the_report_imports_it():
    graph = _import_graph()
    assert graph["lowbit.formats"] == set()
    users_of_report = {m for m, edges in graph.items() if any(e.startswith("lowbit.compare") for e in edges)}
    assert users_of_report - {m for m in graph if m.startswith("lowbit.compare")} == {"lowbit", "lowbit.cli", "lowbit.testing"}


def test_import_leaves_the_report_dependencies_unloaded():
    # pandas, matplotlib and rich load only when a rendering needs them, never with `import lowbit`.
    code = "import sys, lowbit; print(sorted({'pandas', 'matplotlib', 'rich'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_the_rebuild_hint_names_where_lowbit_came_from():
    # lowbit is not on PyPI: after a torch upgrade the hint must rebuild from the checkout (or wheel) it came from.
    from lowbit._native import _rebuild_hint

    hint = _rebuild_hint("2.12.0")
    assert "pip install --no-build-isolation --force-reinstall --no-deps " in hint and "torch 2.12.0" in hint
    assert not hint.rstrip("`.").endswith("--no-deps lowbit")
