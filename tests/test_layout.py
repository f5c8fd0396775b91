"""The package's imports flow one way (cli -> build -> tasks -> data modules -> components ->
registry/errors), with no cycle, and a plain clone resolves ``mmlightning.data_modules``."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "mmlightning"

# Lowest layer first. A module may import modules of its own layer or below, never above.
LAYERS: list[tuple[str, ...]] = [
    ("mmlightning.errors", "mmlightning.registry"),
    ("mmlightning", "mmlightning.encoders", "mmlightning.fusion", "mmlightning.fusion_objectives", "mmlightning.prompts",
     "mmlightning.losses",
     "mmlightning.metrics",
     "mmlightning.optim", "mmlightning.report_blocks", "mmlightning.loggers", "mmlightning.fault_tolerance",
     "mmlightning.runs", "mmlightning.config", "mmlightning.hf_dual_encoder", "mmlightning.recipes"),
    ("mmlightning.data_modules",),
    ("mmlightning.tasks",),
    ("mmlightning.build", "mmlightning.report", "mmlightning.summary", "mmlightning.export", "mmlightning.wise_ft"),
    ("mmlightning.cli",),
]


def layer_of(module: str) -> int:
    """The layer of the longest prefix that names ``module`` or a package above it."""
    best, best_len = None, -1
    for level, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best_len:
                best, best_len = level, len(prefix)
    assert best is not None, f"{module} is in no layer of tests/test_layout.py: add it where it belongs"
    return best


def package_modules() -> dict[str, Path]:
    """Every module under mmlightning/, following the links to data_modules/ and recipes/."""
    modules = {}
    paths = [Path(d) / f for d, _, files in os.walk(PACKAGE, followlinks=True) for f in files if f.endswith(".py")]
    for path in sorted(paths):
        parts = path.relative_to(REPO).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        modules[name] = path
    return modules


def imports_of(path: Path, name: str, known: set[str]) -> set[str]:
    """The package's modules that ``path`` imports anywhere (module level or in a function)."""
    is_package = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".") if is_package else name.split(".")[:-1]
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:  # `import a.b.c` names a.b.c; a symbol's module is its prefix
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = package_modules()
    known = set(modules)
    return {name: imports_of(path, name, known) for name, path in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_graph_sees_imports_inside_functions_and_packages() -> None:
    graph = import_graph()
    assert "mmlightning.data_modules.shapes" in graph and "mmlightning.tasks.clip" in graph
    assert "mmlightning.build" in graph["mmlightning.cli"]  # imported inside a command function
    assert {"mmlightning.tasks.clip", "mmlightning.tasks.vqa"} <= graph["mmlightning.tasks"]


def test_cycle_detection_finds_a_planted_cycle() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]


def test_no_import_cycle() -> None:
    assert cycles(import_graph()) == []


def test_imports_flow_down_the_layers() -> None:
    upward = [f"{name} (layer {layer_of(name)}) imports {target} (layer {layer_of(target)})"
              for name, targets in import_graph().items() for target in sorted(targets)
              if layer_of(target) > layer_of(name)]
    assert upward == []


def test_a_plain_clone_resolves_the_top_level_folders() -> None:
    """No install, no site-packages (``-S``): the repo root on the path is enough, as for an
    editor opening a fresh clone."""
    code = ("import sys, importlib.util as u; sys.path.insert(0, sys.argv[1]); "
            "print(u.find_spec('mmlightning.data_modules.common').origin); "
            "print(u.find_spec('mmlightning.recipes').origin)")
    out = subprocess.run([sys.executable, "-S", "-c", code, str(REPO)], capture_output=True, text=True, check=True)
    common, recipes = out.stdout.split()
    assert Path(common).resolve() == (REPO / "data_modules" / "common.py").resolve()
    assert Path(recipes).resolve() == (REPO / "recipes" / "__init__.py").resolve()
