"""``model.checkpoint`` as a Hugging Face Hub model ID, resolved through a cache laid out as huggingface_hub lays it
out (``models--org--name/{blobs,refs,snapshots}``), built here from the tiny checkpoint; no network."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from _tiny import write_classification_data

REPO = Path(__file__).resolve().parents[1]
REPO_ID = "tiny-org/tiny-llama"


def cache_snapshot(cache: Path, repo_id: str, source: Path, *, refs=("main",), commit: str = "") -> Path:
    """``source``'s files as one snapshot of ``repo_id`` in the hub cache ``cache``: each file a blob named by its
    hash, linked from ``snapshots/<commit>/``, and ``refs/<name>`` holding the commit. Returns the snapshot folder."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    commit = commit or hashlib.sha1(repo_id.encode() + str(sorted(os.listdir(source))).encode()).hexdigest()
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True, exist_ok=True)
    for path in sorted(source.iterdir()):
        data = path.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snapshot / path.name).symlink_to(os.path.relpath(blob, snapshot))
    (repo / "refs").mkdir(exist_ok=True)
    for ref in refs:
        (repo / "refs" / ref).write_text(commit)
    return snapshot


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An empty hub cache under ``HF_HOME``, offline (huggingface_hub reads both at import: its constants too)."""
    from huggingface_hub import constants

    cache = tmp_path / "hf_home" / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


@pytest.mark.parametrize("value, expected", [
    ("Qwen/Qwen3-0.6B", ("Qwen/Qwen3-0.6B", None)),
    ("meta-llama/Llama-3.2-1B-Instruct@main", ("meta-llama/Llama-3.2-1B-Instruct", "main")),
    ("org/name@refs/pr/1", ("org/name", "refs/pr/1")),
    ("org/my_model.v2@0123456789abcdef0123456789abcdef01234567",
     ("org/my_model.v2", "0123456789abcdef0123456789abcdef01234567")),
    ("/ckpt/llama", None), ("./org/name", None), ("~/org", None), ("org/name/extra", None), ("name", None),
    ("../name", None), ("org/..", None), ("org/name@", None), ("org/na me", None),
])
def test_what_reads_as_a_hub_model_id(value, expected):
    from nemo_customizer.checkpoints.hub import split_hub_id

    assert split_hub_id(value) == expected


def test_a_cached_hub_id_resolves_to_its_snapshot_by_branch_tag_and_commit(hub_cache, model_dir):
    from nemo_customizer.checkpoints.resolve import checkpoint_directory

    snapshot = cache_snapshot(hub_cache, REPO_ID, model_dir, refs=("main", "v1"))
    assert checkpoint_directory(REPO_ID) == snapshot
    assert checkpoint_directory(f"{REPO_ID}@v1") == snapshot
    assert checkpoint_directory(f"{REPO_ID}@{snapshot.name}") == snapshot
    assert (snapshot / "config.json").is_symlink()  # the layout huggingface_hub writes


def test_a_local_folder_named_like_an_id_wins(hub_cache, model_dir, tmp_path, monkeypatch):
    from nemo_customizer.checkpoints.resolve import checkpoint_directory

    cache_snapshot(hub_cache, REPO_ID, model_dir)
    local = tmp_path / "work" / REPO_ID
    local.mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "work")
    assert checkpoint_directory(REPO_ID) == Path(REPO_ID)


def test_a_job_trains_from_a_cached_hub_id(hub_cache, model_dir, tmp_path):
    from nemo_customizer.api import customize

    snapshot = cache_snapshot(hub_cache, REPO_ID, model_dir)
    write_classification_data(tmp_path / "data", n_train=8, n_val=4)
    result = customize("tiny-llama-test", dataset=str(tmp_path / "data"), output_dir=str(tmp_path / "job"),
                       progress_bar=False, hyperparameters={"epochs": 1, "batch_size": 4, "micro_batch_size": 4},
                       model={"checkpoint": REPO_ID, "random_weights": False})
    assert result.steps == 2
    config = (tmp_path / "job" / "config.yaml").read_text()
    assert f"checkpoint: {REPO_ID}" in config  # the job records the ID it was given
    assert snapshot.is_dir()


@pytest.mark.parametrize("revision", [None, "v2"])
def test_an_uncached_id_offline_fails_before_any_data_is_read(hub_cache, tmp_path, revision):
    """The error names the cache it looked in and the exact command that fetches the model; the dataset (whose
    first row is malformed) is never read."""
    from nemo_customizer.api import customize
    from nemo_customizer.config import ConfigError

    data = tmp_path / "data"
    data.mkdir()
    (data / "training.jsonl").write_text("not json\n")
    value = "tiny-org/absent" + (f"@{revision}" if revision else "")
    with pytest.raises(ConfigError) as error:
        customize("tiny-llama-test", dataset=str(data), output_dir=str(tmp_path / "job"), progress_bar=False,
                  model={"checkpoint": value, "random_weights": False})
    message = str(error.value)
    command = "hf download tiny-org/absent" + (f" --revision {revision}" if revision else "")
    assert f"`{command}`" in message and "HF_HUB_OFFLINE=1" in message and str(hub_cache) in message
    assert message.startswith(f"model.checkpoint={value}: no such local folder")
    assert not (tmp_path / "job").exists()


def test_a_partial_snapshot_counts_as_not_cached(hub_cache, model_dir, tmp_path):
    """A snapshot holding config.json alone (``hf download org/name config.json``) is not a checkpoint."""
    from nemo_customizer.checkpoints.resolve import checkpoint_directory
    from nemo_customizer.config import ConfigError

    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "config.json").write_bytes((model_dir / "config.json").read_bytes())
    cache_snapshot(hub_cache, REPO_ID, partial)
    with pytest.raises(ConfigError, match=f"`hf download {REPO_ID}`"):
        checkpoint_directory(REPO_ID)


def test_an_unreachable_hub_fails_with_the_command_and_the_offline_switch(hub_cache, monkeypatch):
    """Online but the Hub cannot be reached (here: a closed local port as its endpoint)."""
    from huggingface_hub import constants

    from nemo_customizer.checkpoints.resolve import checkpoint_directory
    from nemo_customizer.config import ConfigError

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{port}")
    with pytest.raises(ConfigError) as error:
        checkpoint_directory("tiny-org/absent")
    message = str(error.value)
    assert "downloading it failed" in message and "`hf download tiny-org/absent`" in message
    assert "set HF_HUB_OFFLINE=1" in message


def test_hf_home_names_the_cache_in_a_fresh_process(tmp_path, model_dir):
    """huggingface_hub reads HF_HOME when imported: a new process with only the environment set finds the
    snapshot under ``$HF_HOME/hub``."""
    snapshot = cache_snapshot(tmp_path / "hf_home" / "hub", REPO_ID, model_dir)
    env = {key: value for key, value in os.environ.items() if not key.startswith(("HF_", "HUGGINGFACE_"))}
    env.update(HF_HOME=str(tmp_path / "hf_home"), HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO))
    code = ("import json; from nemo_customizer.checkpoints.resolve import checkpoint_directory; "
            f"print(json.dumps(str(checkpoint_directory({REPO_ID!r}))))")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert Path(json.loads(out.stdout.strip().splitlines()[-1])) == snapshot


def test_a_job_records_the_commit_it_trained_on_and_a_resume_asks_for_it(hub_cache, model_dir, tmp_path):
    """config.yaml pins ``model.checkpoint_revision`` to the snapshot's commit; once ``main`` moves on (a later
    push, fetched into the cache), resuming the unfinished job still resolves the commit it started from."""
    from nemo_customizer.api import customize
    from nemo_customizer.checkpoints.resolve import resolve_model
    from nemo_customizer.config import config_from_file
    from nemo_customizer.jobs import JobDirectory, with_recorded_checkpoint_revision

    first = cache_snapshot(hub_cache, REPO_ID, model_dir, commit="a" * 40)
    write_classification_data(tmp_path / "data", n_train=8, n_val=4)
    customize("tiny-llama-test", dataset=str(tmp_path / "data"), output_dir=str(tmp_path / "job"),
              progress_bar=False, hyperparameters={"epochs": 1, "batch_size": 4, "micro_batch_size": 4},
              model={"checkpoint": REPO_ID, "random_weights": False})
    saved = config_from_file(tmp_path / "job" / "config.yaml")
    assert (saved.model.checkpoint, saved.model.checkpoint_revision) == (REPO_ID, first.name)

    (tmp_path / "job" / "result.json").unlink()  # unfinished, as a stopped job is
    pushed = cache_snapshot(hub_cache, REPO_ID, model_dir, commit="b" * 40)  # refs/main now names this one
    # The same command line as the first run: no commit of its own.
    rerun = dataclasses.replace(saved, model=dataclasses.replace(saved.model, checkpoint_revision=None))
    assert resolve_model(rerun.model, None).checkpoint_dir == pushed
    pinned = with_recorded_checkpoint_revision(rerun)
    resolved = resolve_model(pinned.model, None)
    assert resolved.checkpoint_dir == first and resolved.config.checkpoint_revision == first.name
    JobDirectory.create(str(tmp_path / "job"), saved)  # the same settings: accepted as a resume


def test_a_downloaded_snapshot_is_pinned_and_the_pin_is_asked_for(hub_cache, model_dir, monkeypatch):
    """Not cached and online: the commit comes from the folder snapshot_download returns; a recorded commit is the
    revision asked for, in place of the ID's own branch."""
    import huggingface_hub
    from huggingface_hub import constants
    from huggingface_hub.errors import LocalEntryNotFoundError

    from nemo_customizer.checkpoints.resolve import resolve_model
    from nemo_customizer.config import ModelConfig

    asked = []

    def fake_snapshot_download(repo_id, *, revision=None, local_files_only=False, **kwargs):
        asked.append((revision, local_files_only))
        if local_files_only:
            raise LocalEntryNotFoundError("not cached")
        return str(cache_snapshot(hub_cache, repo_id, model_dir, commit=revision if revision == "c" * 40
                                  else "d" * 40))

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    model = ModelConfig(checkpoint=f"{REPO_ID}@main", architecture_from_checkpoint=True)
    assert resolve_model(model, None).config.checkpoint_revision == "d" * 40
    asked.clear()
    pinned = dataclasses.replace(model, checkpoint_revision="c" * 40)
    assert resolve_model(pinned, None).checkpoint_dir.name == "c" * 40
    assert asked == [("c" * 40, True), ("c" * 40, False)]


def test_a_recorded_commit_with_a_local_folder_is_refused(model_dir):
    from nemo_customizer.checkpoints.resolve import resolve_model
    from nemo_customizer.config import ConfigError, ModelConfig

    model = ModelConfig(checkpoint=str(model_dir), checkpoint_revision="a" * 40, architecture_from_checkpoint=True)
    with pytest.raises(ConfigError, match="model.checkpoint_revision=a{40} pins .* not a Hub model ID; drop "
                                          "model.checkpoint_revision"):
        resolve_model(model, None)
