"""``model.checkpoint`` as a Hugging Face Hub model ID (``Qwen/Qwen3-0.6B``, ``org/name@revision``): the folder of
that snapshot in ``huggingface_hub``'s cache, laid out as ``models--org--name/snapshots/<commit>/`` with
``refs/<branch>`` naming the commit.

In this order:
1. A local folder of that name wins (an ID is also a relative path): ``model.checkpoint`` keeps meaning a folder.
2. The snapshot already in the cache (``HF_HUB_CACHE``, else ``$HF_HOME/hub``, else ``~/.cache/huggingface/hub``),
   found without any network request: a GPU node without internet starts at once, and a job trains on the snapshot
   it found (``hf download <id>`` again fetches a newer one).
3. Not cached: downloaded as transformers' ``from_pretrained`` would (``snapshot_download``), only the files a
   checkpoint needs (``CHECKPOINT_FILES``: not the ``original/`` or ``*.bin`` copies some repositories also hold).
   Every process of a job resolves it; huggingface_hub's file locks let one download each file while others wait.
   Offline (``HF_HUB_OFFLINE=1``), unreachable, unknown or gated: a ``ConfigError`` naming the command that fetches
   it, raised before any data is read.

The snapshot's folder is named by its commit (``snapshot_commit``): the job records it as
``model.checkpoint_revision`` in its config.yaml, and a rerun or resume from that config asks for that commit, so a
later push to the repository does not change the weights of a job under way.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Optional, Tuple

from nemo_customizer.config import ConfigError

CHECKPOINT_FILES = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"]
"""What a checkpoint needs from a repository: config.json, the safetensors weights and their index, the tokenizer's
files (tokenizer.json, SentencePiece ``*.model``, BPE ``vocab.json``/``merges.txt``, ``*.tiktoken``) and its chat
template."""

_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*(@[^\s@]+)?")
"""``org/name`` with an optional ``@revision`` (a branch, tag or commit): one slash, no leading ``.``, ``/``, ``~``."""


def split_hub_id(value: str) -> Optional[Tuple[str, Optional[str]]]:
    """``(repo_id, revision or None)`` when ``value`` reads as a Hub model ID, else None."""
    if not _HUB_ID.fullmatch(value) or ".." in value.split("@", 1)[0]:
        return None
    repo_id, _, revision = value.partition("@")
    return repo_id, revision or None


def download_command(repo_id: str, revision: Optional[str]) -> str:
    """The ``hf`` command (huggingface_hub's CLI) that puts the snapshot in the cache."""
    return f"hf download {repo_id}" + (f" --revision {revision}" if revision else "")


def snapshot_commit(snapshot: Path) -> str:
    """The commit of a snapshot folder ``hub_snapshot`` returned (huggingface_hub names it ``snapshots/<commit>``)."""
    return snapshot.name


def hub_snapshot(value: str, commit: Optional[str] = None) -> Path:
    """The cache folder of the Hub model ``value`` (``org/name[@revision]``), downloaded when missing and allowed
    (module docstring); ``ConfigError`` when it cannot be had. ``commit`` (a job's recorded
    ``model.checkpoint_revision``) is asked for in place of the ID's own revision."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError,
                                        RevisionNotFoundError)

    repo_id, revision = split_hub_id(value)
    revision = commit or revision
    cache = constants.HF_HUB_CACHE
    fetch = (f"Fetch it where the Hub is reachable, into the same cache (HF_HOME / HF_HUB_CACHE): "
             f"`{download_command(repo_id, revision)}`; or point model.checkpoint at a local checkpoint folder.")
    try:
        cached = Path(snapshot_download(repo_id, revision=revision, allow_patterns=CHECKPOINT_FILES,
                                        local_files_only=True))
        if _has_weights(cached):  # else a partial download (e.g. of config.json alone)
            return cached
    except LocalEntryNotFoundError:  # not cached, or cached in part (huggingface_hub's IncompleteSnapshotError)
        pass
    if constants.HF_HUB_OFFLINE:
        raise ConfigError(f"model.checkpoint={value}: no such local folder, and the Hub model {repo_id} "
                          f"{_at(revision)}is not (wholly) in the cache {cache}; HF_HUB_OFFLINE=1 forbids "
                          "downloading it. " + fetch) from None
    try:
        downloaded = Path(snapshot_download(repo_id, revision=revision, allow_patterns=CHECKPOINT_FILES))
    except (RepositoryNotFoundError, GatedRepoError) as error:
        raise ConfigError(f"model.checkpoint={value}: the Hub has no model {repo_id} that this machine may read "
                          f"({type(error).__name__}). Check the ID; a gated or private model needs its terms "
                          "accepted on huggingface.co and a login (`hf auth login`, or HF_TOKEN).") from None
    except RevisionNotFoundError:
        raise ConfigError(f"model.checkpoint={value}: the Hub model {repo_id} has no revision {revision!r}; name a "
                          "branch, tag or commit it has.") from None
    except OSError as error:  # unreachable (LocalEntryNotFoundError), an HTTP error, a full disk
        raise ConfigError(f"model.checkpoint={value}: no such local folder, the Hub model {repo_id} "
                          f"{_at(revision)}is not in the cache {cache}, and downloading it failed "
                          f"({type(error).__name__}: {_first_line(error)}). " + fetch
                          + " On a machine without internet, set HF_HUB_OFFLINE=1 to skip the attempt.") from None
    if not _has_weights(downloaded):
        raise ConfigError(f"model.checkpoint={value}: the Hub model {repo_id} has no *.safetensors weights "
                          f"({downloaded}); convert its weights to safetensors in a local folder and point "
                          "model.checkpoint there.")
    return downloaded


def _has_weights(folder: Path) -> bool:
    return any(folder.glob("*.safetensors"))


def _at(revision: Optional[str]) -> str:
    return f"at revision {revision} " if revision else ""


def _first_line(error: BaseException) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else "no message"
