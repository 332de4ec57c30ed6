"""The packages import one another in one direction only (no import cycles between them)."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "nemo_customizer"


def _imported_modules(path: Path) -> set:
    """Every ``nemo_customizer`` module a file imports, at module level or inside functions."""
    return {name for name in _all_imports(path) if name.startswith("nemo_customizer.")}


@pytest.mark.parametrize("lower, upper", [("checkpoints", "models")])
def test_a_lower_package_never_imports_a_higher_one(lower, upper):
    offenders = {f"{path.name} imports {module}" for path in (PACKAGE / lower).glob("*.py")
                 for module in _imported_modules(path) if module.startswith(f"nemo_customizer.{upper}")}
    assert not offenders, f"{lower}/ must not import {upper}/ ({upper}/ imports {lower}/): {sorted(offenders)}"


def _package_of(module: str) -> str:
    return module.split(".")[1]


def test_no_two_packages_import_each_other():
    """Over every module of the library: if package A imports package B, B never imports A (``compat/``,
    ``config/`` and ``data/`` at the bottom, ``api.py`` at the top)."""
    edges = {}
    for path in PACKAGE.rglob("*.py"):
        source = path.relative_to(PACKAGE).parts[0].removesuffix(".py")
        for module in _imported_modules(path):
            target = _package_of(module)
            if target != source:
                edges.setdefault(source, set()).add(target)
    mutual = sorted({tuple(sorted((a, b))) for a, targets in edges.items() for b in targets
                     if a in edges.get(b, set())})
    assert not mutual, f"packages that import each other: {mutual}"


def _all_imports(path: Path) -> set:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return names


def test_data_and_config_import_no_megatron():
    """Data and config errors must surface before any heavy import."""
    offenders = sorted(f"{path.relative_to(PACKAGE)} imports {name}"
                       for package in ("data", "config") for path in (PACKAGE / package).rglob("*.py")
                       for name in _all_imports(path) if name.split(".")[0] == "megatron")
    assert not offenders, offenders
