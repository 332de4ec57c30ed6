"""Model names → LoRA adapters: discovery in ``adapters_dir``, loading on first use, runtime load and unload.

Names: the base model is served as ``serving.model_name`` (default ``model.name``); an adapter ``NAME`` as
``BASE@NAME`` or just ``NAME``. ``adapters_dir/NAME/adapter_config.json`` (an HF PEFT adapter) and
``adapters_dir/NAME/adapter/adapter_config.json`` (a customization job's output directory) are adapters; the
directory is scanned again whenever a name is not known yet, so an adapter copied in while the server runs is
served without a restart. All adapters share the one copy of the base weights (``peft.multi_lora``).
"""

from __future__ import annotations

import re
import threading
from pathlib import Path
from typing import Dict, List, Optional

from safetensors import SafetensorError

from nemo_customizer.peft.export import ADAPTER_CONFIG
from nemo_customizer.peft.multi_lora import AdapterInfo, MultiLoRA
from nemo_customizer.serving.errors import APIError, bad_request, model_not_found

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
SEPARATOR = "@"


def adapter_directory(path: Path) -> Optional[Path]:
    """The HF PEFT adapter folder at ``path`` (itself, or a job directory's ``adapter/``), or None."""
    for candidate in (path, path / "adapter"):
        if (candidate / ADAPTER_CONFIG).is_file():
            return candidate
    return None


class AdapterRegistry:
    """The served model names and the adapters behind them."""

    def __init__(self, lora: MultiLoRA, base_name: str, adapters_dir: Optional[str] = None):
        self.lora = lora
        self.base_name = base_name
        self.adapters_dir = Path(adapters_dir).expanduser() if adapters_dir else None
        if self.adapters_dir is not None and not self.adapters_dir.is_dir():
            raise FileNotFoundError(f"serving.adapters_dir={adapters_dir}: no such directory")
        self._paths: Dict[str, Path] = {}  # every known adapter: found in adapters_dir or loaded at runtime
        self._lock = threading.Lock()  # one load at a time: two first requests for an adapter load it once

    def discover(self) -> Dict[str, Path]:
        """Scan ``adapters_dir`` for adapters; returns every known adapter name → directory."""
        if self.adapters_dir is not None:
            for entry in sorted(self.adapters_dir.iterdir()):
                found = adapter_directory(entry) if entry.is_dir() and _NAME.fullmatch(entry.name) else None
                if found is not None:
                    self._paths.setdefault(entry.name, found)
        return dict(self._paths)

    def model_ids(self) -> List[str]:
        """The base model's name, then ``BASE@NAME`` for every known adapter (loaded or not yet)."""
        return [self.base_name] + [f"{self.base_name}{SEPARATOR}{name}" for name in sorted(self.discover())]

    def info(self, name: str) -> Optional[AdapterInfo]:
        return self.lora.adapters.get(name)

    def resolve(self, model: str) -> Optional[str]:
        """The adapter that request field ``model`` names (None: the base model), loaded if it was not yet.

        Raises APIError 404 for an unknown name, 400 for an adapter that cannot be loaded (its message says why).
        """
        if model == self.base_name:
            return None
        name = model[len(self.base_name) + 1:] if model.startswith(self.base_name + SEPARATOR) else model
        if name not in self.lora.adapters and name not in self._paths:
            self.discover()
        if name not in self.lora.adapters and name not in self._paths:
            raise model_not_found(model, self.model_ids())
        self._ensure_loaded(name, self._paths.get(name))
        return name

    def load(self, name: str, path: str) -> AdapterInfo:
        """Load the adapter at ``path`` (an adapter folder or a job directory) as ``name`` now."""
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise bad_request(f"adapter name {name!r} must be 1-128 letters, digits, '.', '_' or '-', starting with "
                              "a letter or digit", param="lora_name")
        if name == self.base_name:
            raise bad_request(f"{name!r} is the base model's name; pick another adapter name", param="lora_name")
        directory = adapter_directory(Path(path).expanduser())
        if directory is None:
            raise bad_request(f"{path}: no {ADAPTER_CONFIG} there (nor in {path}/adapter); point lora_path at an HF "
                              "PEFT adapter directory", param="lora_path")
        with self._lock:
            if name in self.lora.adapters or name in self._paths:
                raise bad_request(f"an adapter named {name!r} already exists; unload it first", param="lora_name")
            self._paths[name] = directory
        try:
            return self._ensure_loaded(name, directory)
        except APIError:
            self._paths.pop(name, None)
            raise

    def unload(self, name: str) -> None:
        """Drop adapter ``name`` from memory (the caller checked that no request uses it). One found in
        ``adapters_dir`` loads again on its next request."""
        with self._lock:
            if name not in self.lora.adapters:
                raise APIError(404, f"no adapter named {name!r} is loaded", param="lora_name",
                               code="model_not_found")
            self.lora.remove(name)
            path = self._paths.get(name)
            if path is not None and (self.adapters_dir is None or self.adapters_dir not in path.parents):
                del self._paths[name]  # loaded through the endpoint: forget it entirely

    def preload(self) -> List[AdapterInfo]:
        """Load every adapter of ``adapters_dir`` now."""
        return [self._ensure_loaded(name, path) for name, path in sorted(self.discover().items())]

    def _ensure_loaded(self, name: str, directory: Optional[Path]) -> AdapterInfo:
        with self._lock:
            if name in self.lora.adapters:
                return self.lora.adapters[name]
            try:
                return self.lora.add(name, directory)
            except (OSError, ValueError, KeyError, SafetensorError) as exc:  # unreadable or malformed files
                raise bad_request(f"adapter {name!r} cannot be loaded: {exc}", param="model",
                                  code="adapter_load_failed") from exc
