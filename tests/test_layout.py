"""The house: python/hexfast is laid out as the data flows, and its imports point one way.

    cli → bench → score → outputs / engines / stream → slide → base (errors, markers, bundle, files, _core)
    cli → view → outputs, slide;  cli → watch → score, outputs

Read from the source, not by importing it, so an import inside a function counts as much as one at
the top of a module. Checked: no import cycle anywhere in the package, and no import of a layer
from one below it (nor between the siblings outputs, engines and stream). The checker is itself
tested on a copy of the package with a cycle and a wrong-way import planted in it.
"""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "python" / "hexfast"
BASE = {"errors", "markers", "bundle", "files", "localhttp", "_core"}
# What each layer may import, besides itself. "top" is hexfast/__init__ and __main__.
ALLOWED = {
    "base": set(),
    "slide": {"base"},
    "stream": {"slide", "base"},
    "engines": {"base"},
    "outputs": {"slide", "base"},
    "score": {"outputs", "engines", "stream", "slide", "base"},
    "bench": {"score", "outputs", "engines", "stream", "slide", "base"},
    "view": {"outputs", "slide", "base"},
    "watch": {"score", "outputs", "slide", "base"},
    "cli": {"watch", "view", "bench", "score", "outputs", "engines", "stream", "slide", "base"},
    "top": {"cli", "watch", "view", "bench", "score", "outputs", "engines", "stream", "slide", "base"},
}


def modules(root: Path) -> dict[str, Path]:
    """Module name -> source file, for every .py (and the _core stub) under the package root."""
    out = {}
    for path in sorted(root.rglob("*.py*")):
        if path.suffix not in (".py", ".pyi") or "__pycache__" in path.parts:
            continue
        parts = (root.name, *path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out.setdefault(".".join(parts), path)
    return out


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The package's modules `name` imports, anywhere in its source (functions included)."""
    is_package = path.name == "__init__.py"
    package = name if is_package else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                found.add(_deepest_known(alias.name, known))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else _deepest_known(base, known))
    found.discard(None)
    return found


def _deepest_known(dotted: str, known: set[str]) -> str | None:
    parts = dotted.split(".")
    for end in range(len(parts), 0, -1):
        candidate = ".".join(parts[:end])
        if candidate in known:
            return candidate
    return None


def import_graph(root: Path) -> dict[str, set[str]]:
    mods = modules(root)
    return {name: imports(name, path, set(mods)) for name, path in mods.items()}


def layer(name: str) -> str:
    parts = name.split(".")
    if len(parts) == 1 or parts[1] == "__main__":
        return "top"
    return "base" if parts[1] in BASE else parts[1]


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module, or a module importing itself
    (Tarjan's algorithm)."""
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
            if len(component) > 1 or v in graph.get(v, ()):
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def wrong_way(graph: dict[str, set[str]]) -> list[str]:
    bad = []
    for source, targets in sorted(graph.items()):
        for target in sorted(targets):
            a, b = layer(source), layer(target)
            if a != b and b not in ALLOWED[a]:
                bad.append(f"{source} ({a}) imports {target} ({b})")
    return bad


# ---------------------------------------------------------------------------- the package itself


def test_every_module_belongs_to_a_layer():
    assert {layer(name) for name in modules(PACKAGE)} <= set(ALLOWED)


def test_no_import_cycles():
    assert cycles(import_graph(PACKAGE)) == []


def test_imports_point_one_way():
    assert wrong_way(import_graph(PACKAGE)) == []


def test_the_graph_sees_what_the_code_imports():
    """A few edges known from the code, so the checker cannot pass by seeing nothing."""
    graph = import_graph(PACKAGE)
    assert "hexfast.stream.stain" in graph["hexfast.stream.tile_stream"]  # from . import stain
    assert "hexfast._core" in graph["hexfast.stream.stain"]  # from .. import _core
    assert "hexfast.score.pipeline" in graph["hexfast"]  # inside __getattr__
    assert "hexfast.score.cluster" in graph["hexfast.cli.score"]  # inside a function
    assert "hexfast.slide" in graph["hexfast.outputs.tiles"]


# ---------------------------------------------------------------------------- the checker


@pytest.fixture
def copy(tmp_path) -> Path:
    root = tmp_path / "hexfast"
    shutil.copytree(PACKAGE, root, ignore=shutil.ignore_patterns("models", "*.so", "__pycache__"))
    return root


def test_checker_finds_a_planted_cycle(copy):
    with open(copy / "engines" / "base.py", "a", encoding="utf-8") as f:
        f.write("\n\ndef _planted():\n    from . import ort  # ort imports base: a cycle\n")
    assert ["hexfast.engines.base", "hexfast.engines.ort"] in cycles(import_graph(copy))
    assert wrong_way(import_graph(copy)) == []


def test_checker_finds_a_wrong_way_import(copy):
    with open(copy / "slide" / "tiling.py", "a", encoding="utf-8") as f:
        f.write("\n\ndef _planted():\n    from ..cli.slides import cmd_tiles  # which imports hexfast.slide\n")
    graph = import_graph(copy)
    assert "hexfast.slide.tiling (slide) imports hexfast.cli.slides (cli)" in wrong_way(graph)
    assert any({"hexfast.slide.tiling", "hexfast.cli.slides", "hexfast.slide"} <= set(c) for c in cycles(graph))


# ---------------------------------------------------------------------------- what ships beside the code


def test_cli_start_imports_no_benchmark_code():
    code = ("import sys, hexfast.cli; hexfast.cli.build_parser();"
            "print(sorted(m for m in sys.modules if m.startswith(('hexfast.bench', 'hexfast.score.cluster'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_core_stub_names_what_the_extension_defines():
    from hexfast import _core

    tree = ast.parse((PACKAGE / "_core.pyi").read_text(encoding="utf-8"))
    stub = {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
    stub |= {n.target.id for n in tree.body if isinstance(n, ast.AnnAssign)}
    assert stub == {n for n in dir(_core) if not n.startswith("__")} | {"__version__"}
    (cls,) = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "TileStream"]
    methods = {n.name for n in cls.body if isinstance(n, ast.FunctionDef)}
    assert methods - {"__init__"} == {n for n in dir(_core.TileStream) if not n.startswith("_")} | {"__len__"}
    assert (PACKAGE / "py.typed").is_file()


def test_version_is_written_once_in_pyproject():
    import hexfast
    from hexfast import _core

    pyproject = (PACKAGE.parents[1] / "pyproject.toml").read_text(encoding="utf-8")
    (version,) = re.findall(r'^version = "([^"]+)"$', pyproject, re.M)
    assert _core.__version__ == hexfast.__version__ == version
    assert version not in (PACKAGE.parents[1] / "CMakeLists.txt").read_text(encoding="utf-8")
