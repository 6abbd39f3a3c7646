"""The code's layering, checked on its source: the library knows no orchestrator, and no module reaches into
another module's private names (each package's ``__init__`` names its public API)."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OURS = ("unetcore", "flows", "deployments", "app", "tests", "benchmarks", "scripts")
APP_LAYER = ("prefect", "flows", "deployments", "app", "typer", "rich")
PACKAGES = ("unetcore.io", "unetcore.store", "unetcore.model", "unetcore.data", "unetcore.training",
            "unetcore.tracking", "unetcore.inference")


def python_files(*folders: str) -> list[Path]:
    return sorted(p for folder in folders for p in (ROOT / folder).rglob("*.py"))


def imported_modules(tree: ast.AST) -> dict[str, str]:
    """Local name -> module, for every ``import x [as y]`` and ``from x import y`` of our own packages."""
    names: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in OURS:
                    names[alias.asname or alias.name.split(".")[0]] = alias.name
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in OURS:
            for alias in node.names:
                names[alias.asname or alias.name] = f"{node.module}.{alias.name}"
    return names


def private_uses(path: Path) -> list[str]:
    """``from m import _x`` and ``m._x`` where ``m`` is one of our modules (dunders are fine)."""
    tree = ast.parse(path.read_text())
    modules = imported_modules(tree)
    where = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in OURS:
            found += [f"{where}:{node.lineno}: from {node.module} import {a.name}"
                      for a in node.names if a.name.startswith("_") and not a.name.startswith("__")]
        elif (isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")
              and isinstance(node.value, ast.Name) and node.value.id in modules):
            found.append(f"{where}:{node.lineno}: {node.value.id}.{node.attr}")
    return found


def test_the_library_imports_no_app_layer() -> None:
    offenders = []
    for path in python_files("unetcore"):
        for node in ast.walk(ast.parse(path.read_text())):
            modules = ([a.name for a in node.names] if isinstance(node, ast.Import)
                       else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            offenders += [f"{path.relative_to(ROOT)}:{node.lineno}: {m}" for m in modules
                          if m.split(".")[0] in APP_LAYER]
    assert offenders == []


def test_no_module_uses_another_modules_private_names() -> None:
    offenders = [use for path in python_files(*OURS) for use in private_uses(path)]
    assert offenders == []


def test_the_private_name_check_catches_both_forms(tmp_path: Path) -> None:
    """The check above is not vacuous: it finds a private import and a private attribute."""
    bad = tmp_path / "probe.py"
    bad.write_text("from unetcore.ingest import _leaves\nfrom unetcore import nightly\nnightly._one_line(None)\n")
    assert len(private_uses(bad)) == 2


@pytest.mark.parametrize("package", PACKAGES)
def test_each_package_names_its_public_api(package: str) -> None:
    module = importlib.import_module(package)
    public = getattr(module, "__all__", None)
    assert public, f"{package} has no __all__"
    missing = [name for name in public if not hasattr(module, name)]
    assert missing == []
