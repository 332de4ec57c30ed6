"""The packages import one another in one direction only (no import cycles between them)."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "nemo_customizer"


def _imported_modules(path: Path) -> set:
    """Every ``nemo_customizer`` module a file imports, at module level or inside functions."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return {name for name in names if name.startswith("nemo_customizer.")}


@pytest.mark.parametrize("lower, upper", [("checkpoints", "models")])
def test_a_lower_package_never_imports_a_higher_one(lower, upper):
    offenders = {f"{path.name} imports {module}" for path in (PACKAGE / lower).glob("*.py")
                 for module in _imported_modules(path) if module.startswith(f"nemo_customizer.{upper}")}
    assert not offenders, f"{lower}/ must not import {upper}/ ({upper}/ imports {lower}/): {sorted(offenders)}"
