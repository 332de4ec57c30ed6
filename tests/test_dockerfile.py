"""The Dockerfile installs our package with --no-deps (to keep the container's CUDA torch) and lists the
dependencies itself: that list must not fall behind pyproject.toml's."""

import re
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

ROOT = Path(__file__).resolve().parents[1]


def test_dockerfile_installs_every_dependency_but_torch():
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    names = {re.match(r"[A-Za-z0-9_.-]+", spec).group(0).lower() for spec in dependencies} - {"torch"}
    dockerfile = (ROOT / "Dockerfile").read_text().lower()
    installed = set(re.findall(r'"?([a-z0-9_.-]+)(?:[<>=!~][^"\s]*)?"?', dockerfile))
    assert names <= installed, f"the Dockerfile does not install {sorted(names - installed)}"
