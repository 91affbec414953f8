"""The layering rule of docs/design.md, checked on the source: no import cycle among nucflow's
modules (imports inside functions count), and each module imports only modules listed before it
in the design's module table (a package's files may import each other in its own order)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "src" / "nucflow"
DESIGN = REPO / "docs" / "design.md"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports() -> dict[str, set[str]]:
    """Module -> the nucflow modules it imports anywhere in its code (lazily too)."""
    files = {_module_name(p): p for p in SRC.rglob("*.py")}
    found: dict[str, set[str]] = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from the package upwards
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(up + ([node.module] if node.module else []))
                named = {f"{base}.{alias.name}" for alias in node.names} & files.keys()
                targets.update(named or {base})  # `from nucflow import io`: the module io
        found[name] = {t for t in targets if t in files and t != name}
    return found


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph.get(node, ())):
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


def _design_order() -> list[str]:
    """The module table of docs/design.md, bottom up: one entry per row, each a file or
    package name (``errors``, ``io``, ``pipeline``); rows may name several files."""
    text = DESIGN.read_text()
    table = text.split("each module imports only modules listed before it", 1)[1]
    rows = []
    for line in table.splitlines()[1:]:
        if rows and not line.startswith("|"):
            break
        if line.startswith("| `"):
            names = re.findall(r"`(\w+)(?:\.py|/)`", line.split("|")[1])
            rows.append(["nucflow" if n == "__init__" else n for n in names])
    return rows


def _unit(module: str) -> str:
    """The table row a module belongs to: its top-level module or package under nucflow."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "nucflow"


def test_no_import_cycle_among_nucflow_modules():
    cycles = _cycles(_imports())
    assert not cycles, f"import cycles (lazy imports count): {cycles}"


def test_every_module_is_in_the_design_table_in_import_order():
    rows = _design_order()
    row_of = {name: i for i, names in enumerate(rows) for name in names}
    graph = _imports()
    missing = sorted({_unit(m) for m in graph} - row_of.keys())
    assert not missing, f"modules missing from docs/design.md's module table: {missing}"
    upward = sorted(
        f"{module} -> {target}"
        for module, targets in graph.items()
        for target in targets
        if _unit(target) != _unit(module) and row_of[_unit(target)] >= row_of[_unit(module)]
    )
    assert not upward, f"imports of modules not listed before the importer: {upward}"


def test_the_checks_can_fail():
    """The cycle finder finds a planted cycle and the table parser reads real rows."""
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    rows = _design_order()
    assert rows[0] == ["errors"] and ["cli"] in rows
