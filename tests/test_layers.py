"""The package's layering holds: no import circles, inference and analyses without Lightning, the CLI on top."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

PACKAGE = REPO / "patronus"


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """Every patronus module a file imports, at module level or inside functions (lazy imports count too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and node.module.startswith("patronus"):
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}  # `from patronus import runs` imports a module
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("patronus")}
    return found


def graph() -> dict[str, set[str]]:
    files = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: {m for m in imports_of(path) if m in files and m != name} for name, path in files.items()}


def test_no_import_circle_inside_the_package():
    g = graph()
    # Package __init__ files re-export their children; an edge from a child to its own parent package
    # is how Python resolves `from patronus.x import y` anyway, so only module-to-module edges count.
    g = {m: {d for d in deps if not m.startswith(d + ".")} for m, deps in g.items()}
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        path.append(m)
        for d in sorted(g[m]):
            if state.get(d) == 1:
                pytest.fail("import circle: " + " -> ".join(path[path.index(d) :] + [d]))
            if d not in state:
                visit(d)
        path.pop()
        state[m] = 2

    for m in sorted(g):
        if m not in state:
            visit(m)


def test_nothing_below_the_command_line_imports_it():
    offenders = {
        m: sorted(d for d in deps if d.startswith("patronus.cli"))
        for m, deps in graph().items()
        if not m.startswith("patronus.cli") and m != "patronus.__main__"
    }
    assert not {m: d for m, d in offenders.items() if d}, offenders


def test_analyses_neither_draw_nor_write_command_line_code():
    for path in (PACKAGE / "interpret").glob("*.py"):
        text = path.read_text()
        assert "argparse" not in text and "SystemExit" not in text and "matplotlib" not in text, path.name
        assert "patronus.plots" not in imports_of(path), path.name


INFERENCE_MODULES = [
    "patronus",
    "patronus.pipeline",
    "patronus.models",
    "patronus.runs",
    "patronus.edits",
    "patronus.data",
    "patronus.plots",
] + sorted(module_name(p) for p in (PACKAGE / "interpret").glob("*.py"))


def test_inference_and_analyses_do_not_load_lightning():
    code = (
        "import importlib, sys\n"
        f"for m in {INFERENCE_MODULES!r}:\n"
        "    importlib.import_module(m)\n"
        "bad = sorted(k for k in sys.modules if k == 'lightning' or k.startswith(('lightning.', 'pytorch_lightning')))\n"
        "print(bad[:5])\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "[]", proc.stdout
