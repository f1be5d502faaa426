"""The house's walls: which package may import which, no import cycles, rooms of a readable size.

Read from the source with `ast` (every import, including those inside functions, which the commands use to
stay light), so a cycle hidden behind a lazy import is found too.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("cache", "extract", "heads")
MAX_MODULES_PER_FOLDER = 12
# Who may import whom, by package prefix: the stages point one way, and the command kit is a floor of its own.
FORBIDDEN: dict[str, tuple[str, ...]] = {
    "cache": ("heads", "extract"),
    "cache.command_kit": ("cache.format", "cache.reader", "cache.writer", "cache.guarded_file", "cache.cli"),
    "heads": ("extract",),
    "heads.model": ("heads.training", "heads.analysis", "heads.cli"),
    "heads.training": ("heads.cli",),
    "heads.analysis": ("heads.training.joint", "heads.training.grid", "heads.cli"),
}


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_modules() -> dict[str, Path]:
    return {module_name(p): p for pkg in PACKAGES for p in (REPO / pkg).rglob("*.py")}


def imports_of(path: Path, known: set[str]) -> set[str]:
    """Project modules imported anywhere in `path` (`from pkg import mod` counts as importing pkg.mod)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        found |= {n for n in names if n in known}
    return found


def import_graph() -> dict[str, set[str]]:
    modules = project_modules()
    known = set(modules)
    return {name: imports_of(path, known) - {name} for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules (first == last), or None; a plain depth-first search."""
    state: dict[str, int] = {}   # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_cycle_finder_finds_a_cycle_and_accepts_a_tree():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_no_import_cycles_anywhere():
    assert find_cycle(import_graph()) is None


@pytest.mark.parametrize("importer", sorted(FORBIDDEN))
def test_dependencies_point_one_way(importer):
    bad = sorted(f"{mod} imports {dep}" for mod, deps in import_graph().items()
                 if mod == importer or mod.startswith(importer + ".")
                 for dep in deps if any(dep == f or dep.startswith(f + ".") for f in FORBIDDEN[importer]))
    assert bad == []


def test_no_folder_holds_more_than_twelve_modules():
    for pkg in PACKAGES:
        for folder in [REPO / pkg, *[d for d in (REPO / pkg).rglob("*") if d.is_dir() and d.name != "__pycache__"]]:
            modules = [p for p in folder.glob("*.py") if p.name != "__init__.py"]
            assert len(modules) <= MAX_MODULES_PER_FOLDER, (folder, sorted(p.name for p in modules))
            assert (folder / "__init__.py").is_file(), f"{folder} is not a package"


def test_the_launch_entry_is_only_an_entry():
    """`accelerate launch -m heads.ablate` runs the CLI; the grid library never imports a command line."""
    graph = import_graph()
    assert graph["heads.ablate"] == {"heads.cli"}
    assert not any("heads.ablate" in deps for deps in graph.values())
