"""The import layers: utils/ at the bottom; datasets/, models/ and losses/ on it; engine/ on
those; main.py, test.py, tools/, benchmarks/ and the first stage on top. Imports are read
from the source with ast, at module level and inside functions alike: an import deferred
into a function still closes a circle, it only hides it until run time."""
from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import REPO

# Folder -> the package its modules are installed under (pyproject.toml): the first stage is `irn`.
ROOTS = {REPO: "", REPO / "first-stage" / "irn": "irn"}
SKIP = {"tests", ".venv", ".git", "data", "docs", "configs"}

# Package -> layer: an import may go to its own layer or below, never above.
LAYERS = {"utils": 0, "datasets": 1, "models": 1, "losses": 1, "engine": 2}
TOP = 3  # main.py, test.py, tools/, benchmarks/, the first stage


def project_modules() -> dict[str, Path]:
    """Dotted module name -> file, for every project source file outside the tests."""
    mods: dict[str, Path] = {}
    for root, package in ROOTS.items():
        for path in root.rglob("*.py"):
            rel = path.relative_to(root)
            if SKIP & set(rel.parts) or (root == REPO and rel.parts[0] == "first-stage"):
                continue
            parts = [p for p in (package, *rel.with_suffix("").parts) if p]
            if parts[-1] == "__init__":
                parts = parts[:-1]
            mods[".".join(parts)] = path
    return mods


def imported_modules(name: str, path: Path, mods: dict[str, Path]) -> set[str]:
    """The project modules ``name`` imports anywhere in its file (relative imports resolved)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name in mods)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - (node.level - 1)] if package else []
                base = ".".join([*anchor, *([base] if base else [])])
            for alias in node.names:
                sub = f"{base}.{alias.name}" if base else alias.name
                if sub in mods:  # `from datasets import coco`: the submodule
                    found.add(sub)
                elif base in mods:  # `from datasets.coco import NUM_CLASSES`: the module
                    found.add(base)
    found.discard(name)
    return found


def import_graph() -> dict[str, set[str]]:
    mods = project_modules()
    return {name: imported_modules(name, path, mods) for name, path in mods.items()}


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
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


def layer(module: str) -> int:
    return LAYERS.get(module.split(".")[0], TOP)


def test_the_graph_sees_the_known_imports():
    """A guard on the parser itself: imports of every form it must read are found."""
    graph = import_graph()
    assert "datasets.readers" in graph["datasets.voc"]              # from datasets.readers import ...
    assert "utils.config" in graph["datasets.voc"]
    assert {"datasets.coco", "datasets.voc"} <= graph["datasets.build"]  # from datasets import coco, voc
    assert "datasets.synthetic.voc" in graph["datasets.build"]      # inside a function
    assert "models.deeplabv2" in graph["models.build"]              # from . import deeplabv2
    assert "models.build" in graph["models"]                        # from .build import ... (in __init__)
    assert {"datasets.build", "engine.beco", "models.build", "utils.config"} <= graph["engine.config"]
    assert "irn.misc.runtime" in graph["irn.step.train_cam"]         # the first stage, as package irn


def test_no_import_circle_among_the_project_modules():
    assert circles(import_graph()) == []


def test_circles_finds_a_circle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert circles(graph) == [["a", "b", "c"]]


def test_utils_imports_nothing_of_the_layers_above():
    above = {name: sorted(m for m in deps if layer(m) > 0)
             for name, deps in import_graph().items() if layer(name) == 0}
    assert {name: deps for name, deps in above.items() if deps} == {}


def test_no_import_goes_up_a_layer():
    upward = {name: sorted(m for m in deps if layer(m) > layer(name))
              for name, deps in import_graph().items()}
    assert {name: deps for name, deps in upward.items() if deps} == {}


def test_no_file_edits_sys_path():
    """Every entry point finds the packages through the editable install (pyproject.toml), the
    tests included: a sys.path edit would be a second mechanism."""
    edits = []
    for path in REPO.rglob("*.py"):
        if SKIP - {"tests"} & set(path.relative_to(REPO).parts):
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if (isinstance(node, ast.Attribute) and node.attr == "path" and isinstance(node.value, ast.Name)
                    and node.value.id == "sys"):
                edits.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert edits == []
