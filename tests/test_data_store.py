"""The dataset store: upload validates, reports and stores atomically; list/show/delete; names resolve to paths."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from _tiny import write_classification_data
from nemo_customizer import datasets
from nemo_customizer.config import config_from_kwargs
from nemo_customizer.data import DatasetError, load_dataset
from nemo_customizer.data import store as store_module

REPO = Path(__file__).resolve().parents[1]



@pytest.fixture
def upload(model_dir, tmp_path):
    """``datasets.upload`` with the tiny model into ``tmp_path / "store"``."""
    def call(path, name, *, max_seq_length: int = 128, **kwargs):
        kwargs.setdefault("store_dir", tmp_path / "store")
        return datasets.upload(path, name, model="tiny-llama-test", **kwargs, model_overrides={
            "checkpoint": str(model_dir), "random_weights": False, "max_seq_length": max_seq_length})
    return call


def write_jsonl(path: Path, rows: list, raw_lines: tuple[str, ...] = ()) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + "".join(raw_lines))
    return path


def row(prompt: str, completion: str) -> dict:
    return {"prompt": prompt, "completion": completion}


def store_entries(store: Path) -> list[str]:
    """Everything in the store folder, hidden temporaries included."""
    return sorted(p.name for p in store.iterdir()) if store.exists() else []


def test_upload_directory_stores_a_byte_identical_copy(upload, tmp_path):
    data = write_classification_data(tmp_path / "data", n_train=40, n_val=8)
    write_jsonl(data / "test.jsonl", [row("a", "b")])  # neither training nor validation: reported, not stored
    report = upload(data, "cls")

    stored = tmp_path / "store" / "cls"
    assert report.path == str(stored)
    assert sorted(p.name for p in stored.iterdir()) == ["dataset.json", "training.jsonl", "validation.jsonl"]
    assert (stored / "training.jsonl").read_bytes() == (data / "training.jsonl").read_bytes()
    assert (stored / "validation.jsonl").read_bytes() == (data / "validation.jsonl").read_bytes()
    assert (report.format, report.training_rows, report.validation_rows) == ("prompt_completion", 40, 8)
    assert [(Path(f.path).name, f.split, f.format, f.rows) for f in report.files] == [
        ("training.jsonl", "training", "prompt_completion", 40),
        ("validation.jsonl", "validation", "prompt_completion", 8)]
    assert report.ignored_files == (str(data / "test.jsonl"),)

    meta = json.loads((stored / "dataset.json").read_text())
    assert (meta["name"], meta["source"], meta["format"]) == ("cls", str(data.resolve()), "prompt_completion")
    assert meta["rows"] == {"training": 40, "validation": 8}
    assert meta["created"] == report.created and meta["content_sha256"] == report.content_sha256
    import hashlib
    assert meta["files"]["training.jsonl"]["sha256"] == hashlib.sha256(
        (data / "training.jsonl").read_bytes()).hexdigest()
    # The stored copy trains on exactly what the source would have.
    assert load_dataset(stored).train == [
        dataclass_with_origin(e, stored / "training.jsonl") for e in load_dataset(data).train]


def dataclass_with_origin(example, path: Path):
    import dataclasses

    return dataclasses.replace(example, origin=f"{path}:{example.origin.rsplit(':', 1)[1]}")


def test_upload_single_file_normalizes_only_bom_line_ends_and_blank_lines(upload, tmp_path):
    rows = [row(f"prompt {i}", f"answer {i}") for i in range(12)]
    lines = [json.dumps(r, ensure_ascii=False) for r in rows]
    lines[3] = '{"completion": "answer 3",   "prompt": "prompt 3", "extra": [1, 2]}'  # kept verbatim
    source = tmp_path / "mine.jsonl"
    source.write_bytes(b"\xef\xbb\xbf" + "\r\n".join(lines[:6]).encode() + b"\r\n\r\n" +
                       "\n".join(lines[6:]).encode())  # BOM, CRLF, a blank line, no final newline
    report = upload(source, "single")

    stored = tmp_path / "store" / "single"
    assert sorted(p.name for p in stored.iterdir()) == ["dataset.json", "training.jsonl"]
    assert (stored / "training.jsonl").read_text() == "".join(line + "\n" for line in lines)
    assert (report.training_rows, report.validation_rows) == (12, 0)
    assert "no validation files" in str(report)
    # Same rows in the same order, so training's seeded validation split is the same too.
    assert [(e.prompt, e.completion) for e in load_dataset(stored).val] == \
           [(e.prompt, e.completion) for e in load_dataset(source).val]


def test_report_counts_lengths_truncation_and_drops(upload, tmp_path):
    # Byte tokenizer: length = prompt bytes + completion bytes + EOS. max_seq_length=16.
    write_jsonl(tmp_path / "d" / "train.jsonl", [
        row("aaaa", "b"),            # 6: fits
        row("p" * 20, "b"),          # 22: prompt truncated from the left
        row("q", "c" * 20),          # 22: completion + EOS alone is 21 > 16: dropped
        row("a" * 10, "b" * 5),      # 16: fits exactly
    ])
    write_jsonl(tmp_path / "d" / "val.jsonl", [row("x" * 30, "y"), row("x", "y")])  # 32 truncated, 3 fits
    report = upload(tmp_path / "d", "lengths", max_seq_length=16)

    assert (report.model, report.max_seq_length) == ("tiny-llama-test", 16)
    fit = report.training_fit
    assert (fit.unchanged, fit.truncated, fit.dropped) == (2, 1, 1)
    assert fit.dropped_origins == [f"{tmp_path / 'd' / 'train.jsonl'}:3"]
    assert (report.validation_fit.unchanged, report.validation_fit.truncated, report.validation_fit.dropped) == \
           (1, 1, 0)
    h = report.lengths
    assert (h.count, h.min, h.median, h.p95, h.max) == (6, 3, 16, 32, 32)
    assert h.buckets == ((3, 6, 2), (7, 10, 0), (11, 14, 0), (15, 18, 1), (19, 22, 2), (23, 26, 0), (27, 30, 0),
                         (31, 32, 1))
    text = str(report)
    assert "training: 2 fit, 1 truncated, 1 dropped" in text
    assert "validation: 1 fit, 1 truncated, 0 dropped" in text
    assert f"dropped: {tmp_path / 'd' / 'train.jsonl'}:3" in text
    assert "min 3, median 16, p95 32, max 32" in text
    bucket_lines = [line for line in text.splitlines() if " - " in line]
    assert len(bucket_lines) == 8
    assert bucket_lines[0].split()[-1] == "2" and "#" * 40 in bucket_lines[0]  # the tallest bucket has the full bar
    assert bucket_lines[3].endswith("(partly over max_seq_length)")
    assert bucket_lines[4].endswith("(over max_seq_length)") and "partly" not in bucket_lines[4]
    # dataset.json keeps the report, so `show` prints it again without a tokenizer.
    assert str(datasets.dataset_report("lengths", tmp_path / "store")) == text


def test_preference_report_counts_pairs_and_the_lengths_of_their_parts(upload, tmp_path):
    # Byte tokenizer: a prompt is its bytes, a response its bytes + EOS; a pair is as long as its longer sequence.
    write_jsonl(tmp_path / "d" / "train.jsonl", [
        {"prompt": "abcd", "chosen_response": "xy", "rejected_response": "z"},   # 4 + 3: fits
        {"prompt": "p" * 20, "chosen_response": "ok", "rejected_response": "no"},  # 20 + 3: prompt truncated
        {"prompt": "q", "chosen_response": "c" * 20, "rejected_response": "d"},   # chosen + EOS alone is 21: dropped
    ])
    write_jsonl(tmp_path / "d" / "validation.jsonl", [{"prompt": "hi", "chosen": "yes", "rejected": "no"}])  # TRL's
    report = upload(tmp_path / "d", "prefs", max_seq_length=16)

    assert (report.format, report.training_rows, report.validation_rows) == ("preference", 3, 1)
    assert [(f.split, f.format, f.rows) for f in report.files] == [("training", "preference", 3),
                                                                   ("validation", "preference", 1)]
    fit = report.training_fit
    assert (fit.unchanged, fit.truncated, fit.dropped) == (1, 1, 1)
    assert fit.dropped_origins == [f"{tmp_path / 'd' / 'train.jsonl'}:3"]
    assert (report.lengths.count, report.lengths.min, report.lengths.max) == (4, 6, 23)
    parts = report.pair_lengths
    assert (parts.prompt.min, parts.prompt.median, parts.prompt.max) == (1, 2, 20)
    assert (parts.chosen.min, parts.chosen.median, parts.chosen.max) == (3, 3, 21)
    assert (parts.rejected.min, parts.rejected.median, parts.rejected.max) == (2, 2, 3)
    text = str(report)
    lines = text.splitlines()
    assert lines[0] == "dataset 'prefs': preference, 3 training pairs, 1 validation pairs"
    assert "(4 pairs, the longer sequence of each, special tokens included): min 6, median 7, p95 23, max 23" in text
    start = lines.index("token lengths of the parts of each pair:")
    assert lines[start + 1:start + 4] == ["  prompt    min 1, median 2, p95 20, max 20",
                                          "  chosen    min 3, median 3, p95 21, max 21",
                                          "  rejected  min 2, median 2, p95 3, max 3"]
    assert "training: 1 fit, 1 truncated, 1 dropped" in text
    assert str(datasets.dataset_report("prefs", tmp_path / "store")) == text  # round-trips through dataset.json
    assert [(d.name, d.format) for d in datasets.list_datasets(tmp_path / "store")] == [("prefs", "preference")]
    assert "pair" not in str(upload(write_jsonl(tmp_path / "pc.jsonl", [row("a", "b")]), "pc"))


def test_bad_rows_raise_one_error_and_write_nothing(upload, tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", [row("a", "b"), {"prompt": "a"}, row("a", 3)])
    with pytest.raises(DatasetError) as err:
        upload(path, "bad")
    message = str(err.value)
    assert f'{path}:2: field "completion" is missing' in message
    assert f'{path}:3: field "completion" must be a string' in message
    assert store_entries(tmp_path / "store") == []


@pytest.mark.parametrize("where", ["copy", "metadata", "publish"])
def test_failure_during_upload_leaves_nothing(upload, tmp_path, monkeypatch, where):
    data = write_classification_data(tmp_path / "data", n_train=20, n_val=4)
    real_copy_rows = store_module.copy_rows

    def copy_then_fail(sources, dest):
        if dest.name == "validation.jsonl":  # training.jsonl is written by then
            raise OSError(28, "No space left on device")
        return real_copy_rows(sources, dest)

    def fail(*args, **kwargs):
        raise OSError(28, "No space left on device")

    target = {"copy": "copy_rows", "metadata": "_write_metadata", "publish": "publish"}[where]
    monkeypatch.setattr(store_module, target, copy_then_fail if where == "copy" else fail)
    with pytest.raises(OSError, match="No space left"):
        upload(data, "cls")
    assert store_entries(tmp_path / "store") == []
    assert datasets.list_datasets(tmp_path / "store") == []


def test_failed_overwrite_keeps_the_old_dataset(upload, tmp_path, monkeypatch):
    old = upload(write_jsonl(tmp_path / "v1.jsonl", [row("a", "b")] * 3), "cls")
    old_bytes = (tmp_path / "store" / "cls" / "training.jsonl").read_bytes()
    real_replace = os.replace

    def replace(src, dst):  # the new folder cannot be renamed into place
        if Path(dst).name == "cls" and ".tmp-" in Path(src).name:
            raise OSError(5, "Input/output error")
        return real_replace(src, dst)

    monkeypatch.setattr("nemo_customizer.data._store_files.os.replace", replace)
    with pytest.raises(OSError, match="Input/output error"):
        upload(write_jsonl(tmp_path / "v2.jsonl", [row("c", "d")] * 5), "cls", overwrite=True)
    assert store_entries(tmp_path / "store") == ["cls"]
    assert (tmp_path / "store" / "cls" / "training.jsonl").read_bytes() == old_bytes
    assert str(datasets.dataset_report("cls", tmp_path / "store")) == str(old)


def test_existing_name_needs_overwrite(upload, tmp_path):
    upload(write_jsonl(tmp_path / "v1.jsonl", [row("a", "b")] * 3), "cls")
    with pytest.raises(DatasetError, match=r"'cls' already exists .*overwrite=True \(--overwrite\)"):
        upload(write_jsonl(tmp_path / "v2.jsonl", [row("c", "d")] * 5), "cls")
    assert datasets.list_datasets(tmp_path / "store")[0].training_rows == 3
    with pytest.raises(DatasetError, match="already exists"):  # refused before the data is even read
        upload(tmp_path / "missing.jsonl", "cls")

    report = upload(tmp_path / "v2.jsonl", "cls", overwrite=True)
    assert report.training_rows == 5
    assert datasets.list_datasets(tmp_path / "store")[0].training_rows == 5
    assert (tmp_path / "store" / "cls" / "training.jsonl").read_bytes() == (tmp_path / "v2.jsonl").read_bytes()
    assert store_entries(tmp_path / "store") == ["cls"]  # no old copy or temporary left behind


@pytest.mark.parametrize("name", ["", "-x", ".hidden", "a/b", "..", "../x", "a b", "x" * 65, "caf\u00e9", "x:y"])
def test_invalid_names_are_refused_before_reading_data(upload, tmp_path, name):
    with pytest.raises(DatasetError, match="invalid dataset name"):
        upload(tmp_path / "does-not-exist.jsonl", name)
    with pytest.raises(DatasetError, match="invalid dataset name"):
        datasets.get_dataset(name, tmp_path / "store")
    assert store_entries(tmp_path / "store") == []


@pytest.mark.parametrize("name", ["a", "7", "Support-v1.2_final", "x" * 64])
def test_valid_names(name):
    assert datasets.check_name(name) == name


def test_list_get_show_delete(upload, tmp_path):
    store = tmp_path / "store"
    assert datasets.list_datasets(store) == []
    upload(write_jsonl(tmp_path / "b.jsonl", [row("a", "b")] * 4), "beta")
    alpha = upload(write_classification_data(tmp_path / "data", n_train=10, n_val=2), "alpha")

    listed = datasets.list_datasets(store)
    assert [(d.name, d.training_rows, d.validation_rows, d.format) for d in listed] == [
        ("alpha", 10, 2, "prompt_completion"), ("beta", 4, 0, "prompt_completion")]
    assert listed[0].path == store / "alpha" and listed[0].content_sha256 == alpha.content_sha256
    assert datasets.get_dataset("alpha", store) == store / "alpha"
    assert str(datasets.dataset_report("alpha", store)) == str(alpha)

    assert datasets.delete_dataset("alpha", store) == store / "alpha"
    assert [d.name for d in datasets.list_datasets(store)] == ["beta"]
    assert store_entries(store) == ["beta"]
    with pytest.raises(DatasetError, match=r"no stored dataset named 'alpha' .*stored: beta"):
        datasets.get_dataset("alpha", store)
    with pytest.raises(DatasetError, match="no stored dataset named 'alpha'"):
        datasets.delete_dataset("alpha", store)


def test_list_skips_temporaries_and_unreadable_entries(upload, tmp_path):
    store = tmp_path / "store"
    upload(write_jsonl(tmp_path / "a.jsonl", [row("a", "b")]), "good")
    (store / ".good.tmp-1234").mkdir()  # left by a killed upload
    (store / "broken").mkdir()
    (store / "broken" / "dataset.json").write_text("{not json")
    with pytest.warns(UserWarning, match="broken"):
        assert [d.name for d in datasets.list_datasets(store)] == ["good"]


def test_names_resolve_to_stored_paths_and_paths_stay_paths(upload, tmp_path, monkeypatch):
    store = tmp_path / "store"
    source = write_jsonl(tmp_path / "train.jsonl", [row("a", "b")] * 3)
    upload(source, "cls")
    upload(source, "other")

    assert datasets.resolve_dataset_path(str(source), store) == source
    assert datasets.resolve_dataset_path("cls", store) == store / "cls"
    with pytest.raises(DatasetError) as err:
        datasets.resolve_dataset_path("nope", store)
    assert "nope: no such file or directory, and no stored dataset has that name" in str(err.value)
    assert "stored: cls, other" in str(err.value) and "datasets upload PATH --name NAME" in str(err.value)
    with pytest.raises(DatasetError, match="no datasets stored"):
        datasets.resolve_dataset_path("nope", tmp_path / "empty-store")

    monkeypatch.chdir(tmp_path)
    (tmp_path / "cls").mkdir()  # an existing path wins over a stored name
    assert datasets.resolve_dataset_path("cls", store) == Path("cls")
    # dataset.store_dir / $NEMO_CUSTOMIZER_DATASETS say where names are looked up, as api.customize will do it.
    cfg = config_from_kwargs(config="tiny-llama-test", dataset={"path": "other", "store_dir": str(store)})
    assert datasets.resolve_dataset_path(cfg.dataset.path, cfg.dataset.store_dir) == store / "other"
    monkeypatch.setenv("NEMO_CUSTOMIZER_DATASETS", str(store))
    assert datasets.resolve_dataset_path("other") == store / "other"
    assert len(load_dataset(datasets.resolve_dataset_path("other"), val_fraction=0.0).train) == 3


def test_default_store_dir(monkeypatch, tmp_path):
    monkeypatch.delenv("NEMO_CUSTOMIZER_DATASETS", raising=False)
    monkeypatch.delenv("NEMO_CUSTOMIZER_CACHE", raising=False)
    assert datasets.default_store_dir() == Path.home() / ".cache" / "nemo_customizer" / "datasets"
    monkeypatch.setenv("NEMO_CUSTOMIZER_CACHE", str(tmp_path / "cache"))
    assert datasets.default_store_dir() == tmp_path / "cache" / "datasets"
    monkeypatch.setenv("NEMO_CUSTOMIZER_DATASETS", str(tmp_path / "ds"))
    assert datasets.default_store_dir() == tmp_path / "ds"


def test_upload_does_not_import_megatron(model_dir, tmp_path):
    write_jsonl(tmp_path / "t.jsonl", [row("a", "b")])
    code = (
        "import sys; from nemo_customizer import datasets; "
        f"datasets.upload({str(tmp_path / 't.jsonl')!r}, 'x', model='tiny-llama-test', "
        f"store_dir={str(tmp_path / 'store')!r}, "
        f"model_overrides={{'checkpoint': {str(model_dir)!r}, 'random_weights': False}}); "
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'megatron'))"
    )
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
