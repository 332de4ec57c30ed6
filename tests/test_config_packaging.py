"""conf/ ships inside the wheel as nemo_customizer/conf (see compose.conf_dir)."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_pyproject_ships_conf_as_package_data():
    path = REPO / "pyproject.toml"
    if not path.is_file():
        pytest.skip("no pyproject.toml yet")
    setuptools = tomllib.loads(path.read_text()).get("tool", {}).get("setuptools", {})
    assert setuptools.get("package-dir", {}).get("nemo_customizer.conf") == "conf"
    data = setuptools.get("package-data", {})
    assert "*.yaml" in data.get("nemo_customizer.conf", []) and "*.yaml" in data.get("nemo_customizer.conf.model", [])
    packages = setuptools.get("packages")
    assert isinstance(packages, list), "the mapped conf packages need an explicit [tool.setuptools] packages list"
    # setuptools' find cannot see the mapped conf/, so the list is explicit: keep it complete.
    code_packages = {".".join(p.parent.relative_to(REPO).parts) for p in (REPO / "nemo_customizer").rglob("*.py")
                     if "__pycache__" not in p.parts}
    assert code_packages | {"nemo_customizer.conf", "nemo_customizer.conf.model"} <= set(packages)
