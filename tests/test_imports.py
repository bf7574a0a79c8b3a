"""Imports flow one way: moe_core (torch only) <- moe_apps apps <- CLI (every `cli.py`)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _imported_names(path: Path) -> set[str]:
    """Every dotted name a file imports, anywhere in it (``from a.b import c`` gives ``a.b`` and
    ``a.b.c``, since ``c`` may be a module); relative imports are not used in this project."""
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0 and node.module, f"{path}: relative import"
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


CORE_FILES = sorted((ROOT / "moe_core").rglob("*.py"))
APP_FILES = sorted(p for p in (ROOT / "moe_apps").rglob("*.py") if p.name != "cli.py")
STDLIB_OK = {"__future__", "abc", "collections", "dataclasses", "enum", "functools", "itertools", "math",
             "typing", "warnings", "contextlib", "numbers", "operator"}


@pytest.mark.parametrize("path", CORE_FILES, ids=lambda p: p.name)
def test_moe_core_imports_only_torch_and_stdlib(path: Path) -> None:
    for name in _imported_names(path):
        top = name.split(".")[0]
        assert top in {"torch", "moe_core"} | STDLIB_OK, f"{path.name} imports {name}: moe_core may use torch only"


@pytest.mark.parametrize("path", APP_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_apps_never_import_the_cli(path: Path) -> None:
    for name in _imported_names(path):
        assert not (name.startswith("moe_apps.") and name.endswith(".cli")), (
            f"{path} imports {name}; the command lines sit on top of the apps"
        )


def test_moe_core_runs_without_moe_apps() -> None:
    import subprocess
    import sys

    code = "import sys, moe_core; assert not any(m.startswith('moe_apps') for m in sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
