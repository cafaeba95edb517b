"""The package's folders import one way: counted from the code (every import outside `if TYPE_CHECKING:`,
function-level ones included), independently of import-linter's own contract in pyproject.toml."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "qbench"
# highest first: a folder may import the folders after it, never one before it
LAYERS = (("cli",), ("runner",), ("analysis",), ("zoo",), ("cell",), ("machine",), ("contract",))


def _imports(path: Path) -> set[str]:
    """The qbench modules `path` imports outside TYPE_CHECKING blocks."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skipped = {id(node) for block in ast.walk(tree) if isinstance(block, ast.If) and "TYPE_CHECKING" in ast.unparse(block.test)
               for node in ast.walk(block)}
    found = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("qbench.")}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("qbench."):
            found.add(node.module)
    return found


def folder_edges() -> set[tuple[str, str]]:
    """(importing folder, imported folder) pairs between qbench's top-level folders."""
    edges = set()
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE).parts
        if len(parts) < 2:
            continue  # qbench/__init__.py, __main__.py: the package's face
        for module in _imports(path):
            target = module.split(".")[1]
            if target != parts[0] and (PACKAGE / target).is_dir():
                edges.add((parts[0], target))
    return edges


def test_no_folder_imports_a_folder_above_it_or_beside_it_in_its_layer():
    rank = {folder: level for level, folders in enumerate(LAYERS) for folder in folders}
    assert set(rank) == {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    upward = sorted((a, b) for a, b in folder_edges() if rank[b] <= rank[a])
    assert upward == []


def test_there_is_no_cycle_between_top_level_folders():
    edges = folder_edges()
    graph: dict[str, set[str]] = {}
    for a, b in edges:
        graph.setdefault(a, set()).add(b)

    def reaches(start: str) -> set[str]:
        seen, stack = set(), [start]
        while stack:
            for nxt in graph.get(stack.pop(), ()):
                if nxt not in seen:
                    seen.add(nxt)
                    stack.append(nxt)
        return seen

    assert [folder for folder in graph if folder in reaches(folder)] == []


def test_the_counter_sees_function_level_imports(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from qbench.cell import models\nif TYPE_CHECKING:\n    from qbench.cli import x\n")
    assert _imports(module) == {"qbench.cell"}
