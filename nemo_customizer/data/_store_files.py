"""File mechanics of the dataset store: copy or write validated rows, hash them, publish or remove a folder
atomically.

Every change to the store is a rename of a whole folder, so a reader (or a crash) never sees half a dataset.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import secrets
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterable, Sequence

from nemo_customizer.data.formats import Conversation, PreferenceExample, PromptCompletion
from nemo_customizer.data.jsonl import UTF8_BOM


def copy_rows(sources: Sequence[Path], dest: Path) -> tuple[list[int], str]:
    """Write the rows of ``sources`` (in order) to ``dest``; returns the rows per source and ``dest``'s sha256.

    Each row's bytes are kept exactly; only what ``read_jsonl`` ignores is normalized: UTF-8 byte-order marks at
    the start of a line and blank lines are dropped, and every row ends with ``\\n`` (a ``\\r\\n`` ending becomes
    ``\\n``). The sources must already be validated, so every non-blank line is one row.
    """
    digest = hashlib.sha256()
    rows_per_source = []
    with dest.open("wb") as out:
        for source in sources:
            rows = 0
            with source.open("rb") as f:
                for raw in f:
                    row = raw.removeprefix(UTF8_BOM).rstrip(b"\r\n")
                    if not row.decode("utf-8").strip():
                        continue
                    out.write(row + b"\n")
                    digest.update(row + b"\n")
                    rows += 1
            rows_per_source.append(rows)
        out.flush()
        os.fsync(out.fileno())
    return rows_per_source, digest.hexdigest()


def write_rows(rows: Iterable[dict[str, Any]], dest: Path) -> tuple[int, str]:
    """Write ``rows`` to ``dest`` as JSON Lines (UTF-8, non-ASCII as is); returns the row count and the sha256."""
    digest = hashlib.sha256()
    count = 0
    with dest.open("wb") as out:
        for row in rows:
            line = (json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8")
            out.write(line)
            digest.update(line)
            count += 1
        out.flush()
        os.fsync(out.fileno())
    return count, digest.hexdigest()


def example_row(example: Any) -> dict[str, Any]:
    """A validated example as a row of its format (what reads back as the same example)."""
    if isinstance(example, PromptCompletion):
        return {"prompt": example.prompt, "completion": example.completion}
    if isinstance(example, Conversation):
        return {"messages": list(example.messages), **({"tools": list(example.tools)} if example.tools else {})}
    if isinstance(example, PreferenceExample):  # TRL's layout holds text and chat pairs alike
        parts = {key: value if isinstance(value, str) else list(value) for key, value in
                 (("prompt", example.prompt), ("chosen", example.chosen), ("rejected", example.rejected))}
        return {**parts, **({"tools": list(example.tools)} if example.tools else {})}
    raise TypeError(f"not a dataset example: {type(example).__name__}")


def make_temp_dir(store: Path, name: str) -> Path:
    """A fresh hidden folder inside ``store`` (same file system as the target, so the final rename is atomic)."""
    store.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=store))
    tmp.chmod(0o755)  # mkdtemp makes it 0700; a shared store should be readable by its other users
    return tmp


def publish(tmp: Path, target: Path, *, overwrite: bool) -> None:
    """Rename the finished folder ``tmp`` to ``target``.

    Raises ``FileExistsError`` when ``target`` exists and ``overwrite`` is false. With ``overwrite`` the old folder
    is first renamed aside and removed only after the new one is in place (put back if the rename fails), so
    ``target`` is briefly absent but never partly written.
    """
    old = move_aside(target, "old") if overwrite and (target.exists() or target.is_symlink()) else None
    try:
        os.replace(tmp, target)
    except OSError as err:
        if old is not None:
            os.replace(old, target)
            old = None
        if err.errno in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR):
            raise FileExistsError(errno.EEXIST, "already exists", str(target)) from err
        raise
    finally:
        if old is not None:
            remove(old)


def move_aside(path: Path, tag: str) -> Path:
    """Rename ``path`` to a hidden sibling (``.name.tag-xxxxxxxx``) and return the new path."""
    aside = path.parent / f".{path.name}.{tag}-{secrets.token_hex(4)}"
    os.replace(path, aside)
    return aside


def remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
