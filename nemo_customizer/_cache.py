"""The library's cache root (converted embedded checkpoints, the dataset store)."""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "NEMO_CUSTOMIZER_CACHE"


def default_cache_dir() -> Path:
    """``$NEMO_CUSTOMIZER_CACHE``, else ``~/.cache/nemo_customizer``."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "nemo_customizer"
