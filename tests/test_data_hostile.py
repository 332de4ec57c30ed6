"""Hostile input: every broken dataset ends in one ``DatasetError`` naming file:line (and the field) and what to do,
or is handled; never a traceback from deep inside, never a job directory. An unusable output_dir fails before any
data is read or model built.

The corpus is ``tests/data/hostile/`` (tiny files, each one problem); big cases (a 10 MB line, a million rows, very
deep nesting) and file-system cases (links, permissions, pipes) are made at test time in ``tmp_path``.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections import namedtuple
from pathlib import Path

import pytest

from nemo_customizer.data import DatasetError, load_dataset, tokenize_examples

CORPUS = Path(__file__).parent / "data" / "hostile"
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0
root_ignores_permissions = pytest.mark.skipif(IS_ROOT, reason="root ignores file permissions")

HANDLED = {  # file or directory -> (format, rows read with val_fraction=0)
    "bom_utf8.jsonl": ("prompt_completion", 3),
    "bom_mid_file.jsonl": ("prompt_completion", 4),  # `cat` of two files saved with a byte-order mark
    "crlf.jsonl": ("prompt_completion", 3),
    "valid_prompt_completion.jsonl": ("prompt_completion", 4),
    "valid_chat.jsonl": ("chat", 4),
    "dir_train_only": ("prompt_completion", 10),  # no validation file (a split is held out); a "._" file is skipped
    # a .json file may hold one JSON array of rows (as .jsonl it may not: see BROKEN)
    "pretty_printed_array.json": ("prompt_completion", 2),
    "one_line_array.json": ("prompt_completion", 2),
    "dir_no_jsonl": ("prompt_completion", 1),  # train.json beside a README.txt
}

BROKEN = [  # (file or directory, 1-based line or None for the whole file, words the message must hold)
    # not JSON, or JSON we refuse
    ("invalid_json.jsonl", 2, ["invalid JSON: Expecting ',' delimiter (column 16)"]),
    ("truncated_last_line.jsonl", 3, ["invalid JSON: Unterminated string"]),
    ("trailing_garbage.jsonl", 1, ["invalid JSON: Extra data"]),
    ("cr_only_line_endings.jsonl", 1, ["Extra data", "\\r characters", "line endings"]),
    ("pretty_printed_array.jsonl", None, ["one JSON document spread over several lines", "jq -c", "*.json"]),
    ("one_line_array.jsonl", 1, ["row must be a JSON object, got a JSON array of 2 objects",
                                 "one JSON object per line"]),
    ("duplicate_keys.jsonl", 1, ['invalid JSON: key "completion" appears twice in one object']),
    ("deeply_nested.jsonl", 1, ["invalid JSON: nested more than 100 levels deep"]),
    ("huge_integer.jsonl", 1, ["invalid JSON: a number has more than 4300 digits"]),
    ("nan_literal.jsonl", 1, ["invalid JSON: NaN is not a JSON value"]),
    ("lone_surrogate.jsonl", 2, ["lone UTF-16 surrogate"]),
    # a JSON value that is not an object
    ("row_is_array.jsonl", 1, ["row must be a JSON object, got list"]),
    ("row_is_string.jsonl", 1, ["row must be a JSON object, got str"]),
    ("row_is_number.jsonl", 1, ["row must be a JSON object, got int"]),
    ("row_is_null.jsonl", 1, ["row must be a JSON object, got null"]),
    # prompt/completion fields
    ("prompt_number.jsonl", 1, ['field "prompt" must be a string, got int (value 3)']),
    ("prompt_list.jsonl", 1, ['field "prompt" must be a string, got list (value ["a", "b"])']),
    ("completion_null.jsonl", 1, ['field "completion" must be a string, got null']),
    ("huge_float.jsonl", 1, ['field "prompt" must be a string, got float (value Infinity)']),
    ("prompt_blank.jsonl", 1, ['field "prompt" is empty']),
    ("prompt_only.jsonl", 2, ['field "completion" is missing (keys found: "prompt")', "2 problems"]),
    ("missing_fields.jsonl", 1, ['rows are plain text (a "text" field without prompt and completion)',
                                 "continued pretraining", '{"prompt": str, "completion": str}']),
    ("mixed_formats.jsonl", 2, ["row is chat data but this file's first row is prompt_completion data"]),
    ("prompt_row_in_chat_file.jsonl", 2, ["row is prompt/completion data", "first row is chat data"]),
    # chat fields
    ("chat_messages_not_list.jsonl", 1, ['field "messages" must be a list of message objects, got object']),
    ("chat_messages_empty.jsonl", 1, ['field "messages" is empty']),
    ("chat_content_number.jsonl", 1, ['field "messages[0].content" must be a string, got int']),
    ("chat_content_parts.jsonl", 1, ['field "messages[0].content" must be a string, got list']),
    ("chat_role_missing.jsonl", 1, ['field "messages[0].role" must be one of', "(missing)"]),
    ("chat_role_unknown.jsonl", 1, ['field "messages[0].role" must be one of', '(got "robot")']),
    ("chat_tool_calls_malformed.jsonl", 1, ['field "messages[1].tool_calls" must be a list, got object']),
    ("chat_arguments_not_json.jsonl", 1,
     ['field "messages[1].tool_calls[0].function.arguments" is a string but not valid JSON']),
    ("chat_prompt_only.jsonl", 1, ["the last message must be an assistant message"]),
    # empty
    ("empty.jsonl", None, ["file is empty (no rows)"]),
    ("whitespace_only.jsonl", None, ["file is empty (no rows)"]),
    ("blank_lines_only.jsonl", None, ["file is empty (no rows)"]),
    # not UTF-8 text
    ("utf16.jsonl", None, ["file is UTF-16 encoded", "Save the file as UTF-8"]),
    ("utf16_no_bom.jsonl", None, ["file is UTF-16 encoded"]),
    ("latin1.jsonl", 2, ["bytes are not valid UTF-8 (byte 0xe9 at column 16)", "Save the file as UTF-8"]),
    ("nul_bytes.jsonl", 2, ["NUL byte (column 14)"]),
    ("gzipped.jsonl", None, ["file is gzip-compressed", "gunzip"]),
    # directories
    ("dir_mixed_formats/validation.jsonl", None, ["validation data is chat but training data is prompt_completion"]),
]


def load_error(path: Path, **kwargs) -> str:
    """The message of the ``DatasetError`` loading ``path`` raises (any other exception fails the test)."""
    with pytest.raises(DatasetError) as info:
        load_dataset(path, **kwargs)
    return str(info.value)


def assert_user_error(message: str, path: Path, line: int | None, words=()) -> None:
    """``message`` names ``path`` (and ``line``), holds ``words``, ends with what to do, and stays short."""
    location = f"{path}:{line}: " if line else f"{path}: "
    assert location in message, message
    for word in words:
        assert word in message, message
    last = message.splitlines()[-1]
    assert last.endswith(".") and re.search(r"(^|\. )[A-Z]", last), f"no hint saying what to do: {message}"
    assert len(message) < 4000  # hostile values are cut, never echoed whole


def tiny_tokenizer(model_dir: Path):
    from nemo_customizer.checkpoints.resolve import load_tokenizer

    return load_tokenizer(model_dir, "chatml-tools")


# --- the corpus ----------------------------------------------------------------------------------------------------

def test_every_corpus_file_has_an_expectation():
    listed = set(HANDLED) | {name.split("/")[0] for name, _, _ in BROKEN}
    present = {p.name for p in CORPUS.iterdir() if not p.name.startswith(".")}
    assert present == listed


@pytest.mark.parametrize("name, line, words", BROKEN, ids=[case[0] for case in BROKEN])
def test_broken_file_names_file_line_and_fix(name, line, words):
    path = CORPUS / name
    target = path.parent if name.startswith("dir_") and path.suffix else path  # a directory's file: load the dir
    assert_user_error(load_error(target, val_fraction=0.0), path, line, words)


@pytest.mark.parametrize("name", sorted(HANDLED))
def test_handled_file_loads_and_tokenizes(name, model_dir):
    fmt, rows = HANDLED[name]
    splits = load_dataset(CORPUS / name, val_fraction=0.0)
    assert splits.format == fmt and len(splits.train) == rows and splits.val == []
    tokenized, stats = tokenize_examples(splits.train, tiny_tokenizer(model_dir), max_seq_length=128)
    assert len(tokenized) == rows and stats.dropped == 0
    assert all(sum(example.loss_mask) > 0 for example in tokenized)


def test_bom_and_crlf_rows_equal_plain_rows(tmp_path):
    plain = load_dataset(CORPUS / "crlf.jsonl", val_fraction=0.0).train
    bom = load_dataset(CORPUS / "bom_utf8.jsonl", val_fraction=0.0).train
    assert [(e.prompt, e.completion) for e in plain] == [(e.prompt, e.completion) for e in bom]
    assert all("\r" not in e.completion and "\ufeff" not in e.prompt for e in plain + bom)


def test_directory_without_validation_holds_out_a_seeded_split():
    splits = load_dataset(CORPUS / "dir_train_only")
    assert (len(splits.train), len(splits.val)) == (9, 1) and splits.val_source.startswith("seeded split")
    assert [p.name for p in splits.files.train] == ["train.jsonl"]  # not the macOS "._train.jsonl"


# --- big inputs, made at test time ------------------------------------------------------------------------------------

def test_ten_megabyte_lines(tmp_path, model_dir):
    big = "x" * 10_000_000
    f = tmp_path / "train.jsonl"
    f.write_text(json.dumps({"prompt": big, "completion": " yes"}) + "\n")
    splits = load_dataset(f, val_fraction=0.0)
    assert len(splits.train[0].prompt) == 10_000_000
    # Tokenizing 10 MB is slow on the byte tokenizer; the 1 MB case exercises the same truncation path.
    one_mb = [type(splits.train[0])(prompt=big[:1_000_000], completion=" yes", origin=f"{f}:1")]
    tokenized, stats = tokenize_examples(one_mb, tiny_tokenizer(model_dir), max_seq_length=128)
    assert stats.truncated == 1 and len(tokenized[0].input_ids) == 128

    f.write_text(json.dumps({"prompt": "ok", "completion": "ok"}) + "\n" + '{"prompt": "' + big + '}\n')
    assert_user_error(load_error(f), f, 2, ["invalid JSON: Invalid control character at (column 10000014)"])
    f.write_text(json.dumps({"prompt": list(range(2_000_000)), "completion": "ok"}) + "\n")
    assert_user_error(load_error(f), f, 1, ['field "prompt" must be a string, got list (value [0, 1, 2'])
    f.write_text(json.dumps({f"key{i}": big[:100] for i in range(50_000)}) + "\n")
    assert_user_error(load_error(f), f, 1, ['field "prompt" is missing (keys found: "key0"', "(50000 keys)"])


def test_a_million_tiny_rows_load_in_seconds(tmp_path):
    f = tmp_path / "train.jsonl"
    with f.open("w") as handle:
        handle.writelines(f'{{"prompt": "p{i}", "completion": "c"}}\n' for i in range(1_000_000))
    start = time.perf_counter()
    splits = load_dataset(f)
    seconds = time.perf_counter() - start
    print(f"loaded 1,000,000 rows in {seconds:.1f}s")
    assert (len(splits.train), len(splits.val)) == (900_000, 100_000)
    assert seconds < 60  # a wide margin over the load's time on one core of a shared CI machine

    with f.open("a") as handle:
        handle.write('{"prompt": "p", "completion": 7}\n')
    assert_user_error(load_error(f), f, 1_000_001, ['field "completion" must be a string, got int'])


def test_nesting_far_beyond_the_recursion_limit(tmp_path):
    f = tmp_path / "train.jsonl"
    f.write_text('{"prompt": ' + "[" * 100_000 + "]" * 100_000 + ', "completion": "b"}\n')
    assert_user_error(load_error(f), f, 1, ["nested more than 100 levels deep"])
    f.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "tool_calls": [
        {"function": {"name": "f", "arguments": "[" * 5000 + "]" * 5000}}]}]}) + "\n")
    assert_user_error(load_error(f), f, 1, ["arguments\" is a string but not valid JSON: nested more than 100"])


# --- the file system -----------------------------------------------------------------------------------------------

def test_links_pipes_and_directories_in_place_of_files(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.jsonl").symlink_to(data / "train.jsonl")  # a link loop
    assert_user_error(load_error(data), data / "train.jsonl", None, ["cannot read the file", "symbolic links"])
    assert_user_error(load_error(data / "train.jsonl"), data / "train.jsonl", None, ["link loop"])

    (data / "train.jsonl").unlink()
    (data / "train.jsonl").symlink_to(tmp_path / "gone.jsonl")  # a broken link
    assert_user_error(load_error(data), data / "train.jsonl", None, ["cannot read the file: No such file"])

    (data / "train.jsonl").unlink()
    os.mkfifo(data / "train.jsonl")  # reading a pipe would block forever
    assert_user_error(load_error(data), data / "train.jsonl", None, ["not a regular file"])
    assert_user_error(load_error(data / "train.jsonl"), data / "train.jsonl", None, ["not a regular file or a dir"])

    (data / "train.jsonl").unlink()
    (data / "train.jsonl").mkdir()  # a directory with a data file's name is not data
    assert_user_error(load_error(data), data, None, ["no training file (found: no *.jsonl files)"])


@root_ignores_permissions
def test_unreadable_file_and_directory(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.jsonl").write_text('{"prompt": "a", "completion": "b"}\n')
    (data / "train.jsonl").chmod(0o000)
    assert_user_error(load_error(data), data / "train.jsonl", None, ["cannot read the file: Permission denied"])
    (data / "train.jsonl").chmod(0o600)
    data.chmod(0o000)
    try:
        assert_user_error(load_error(data), data, None, ["cannot list the directory: Permission denied"])
    finally:
        data.chmod(0o700)


# --- customize() and the command line: errors before any job directory exists --------------------------------------

def _model(model_dir: Path) -> dict:
    return {"checkpoint": str(model_dir), "random_weights": False}


def _cli_args(model_dir: Path, dataset: Path, output_dir: Path, *extra: str) -> list[str]:
    return ["model=tiny-llama-test", f"model.checkpoint={model_dir}", "model.random_weights=false", "device=cpu",
            f"dataset.path={dataset}", f"output_dir={output_dir}", "progress_bar=false", *extra]


@pytest.mark.parametrize("name, line", [("invalid_json.jsonl", 2), ("latin1.jsonl", 2), ("gzipped.jsonl", None),
                                        ("chat_role_unknown.jsonl", 1), ("empty.jsonl", None)])
def test_cli_exits_2_naming_file_line_and_writes_no_job(name, line, model_dir, tmp_path, capsys):
    from nemo_customizer import cli

    job = tmp_path / "job"
    assert cli.main(_cli_args(model_dir, CORPUS / name, job, "model.chat_template=chatml-tools")) == 2
    out, err = capsys.readouterr()
    assert err.startswith("error: ") and "Traceback" not in err
    assert_user_error(err.strip(), CORPUS / name, line)
    assert not job.exists()


@pytest.mark.parametrize("name", ["duplicate_keys.jsonl", "mixed_formats.jsonl", "dir_no_jsonl"])
def test_customize_raises_dataset_error_and_writes_no_job(name, model_dir, tmp_path):
    from nemo_customizer.api import customize

    job = tmp_path / "nested" / "job"
    with pytest.raises(DatasetError, match=re.escape(str(CORPUS / name))):
        customize("tiny-llama-test", dataset=str(CORPUS / name), output_dir=str(job), model=_model(model_dir),
                  device="cpu", progress_bar=False)
    assert not (tmp_path / "nested").exists()


def test_too_few_usable_rows_is_a_dataset_error(model_dir, tmp_path, capsys):
    from nemo_customizer import cli

    job = tmp_path / "job"
    data = CORPUS / "valid_prompt_completion.jsonl"  # 4 rows; batch size 16
    assert cli.main(_cli_args(model_dir, data, job)) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "usable training rows is fewer than hyperparameters.batch_size" in err
    assert not job.exists()


def test_bom_crlf_and_blank_lines_train_end_to_end(model_dir, tmp_path):
    from nemo_customizer.api import customize

    rows = [json.dumps({"prompt": f"{label} {i}\nAnswer: ", "completion": label})
            for i, label in enumerate(["yes", "no"] * 10)]
    f = tmp_path / "train.jsonl"
    f.write_bytes(b"\xef\xbb\xbf" + "\r\n\r\n".join(rows).encode() + b"\r\n")
    result = customize("tiny-llama-test", dataset=str(f), output_dir=str(tmp_path / "job"), model=_model(model_dir),
                       device="cpu", progress_bar=False,
                       hyperparameters={"epochs": 1, "batch_size": 8, "micro_batch_size": 8})
    assert result.steps == 2 and (tmp_path / "job" / "adapter").is_dir()


# --- output_dir: checked before any data is read or model built ---------------------------------------------------

@pytest.fixture
def no_data_reading(monkeypatch):
    """Fail the test if customize() gets as far as reading the dataset."""
    from nemo_customizer import api

    def refuse(*args, **kwargs):
        raise AssertionError("the dataset was read before the output_dir check")

    monkeypatch.setattr(api, "_load_inputs", refuse)


def _customize(model_dir: Path, output_dir: Path, **kwargs):
    from nemo_customizer.api import customize

    return customize("tiny-llama-test", dataset=str(CORPUS / "valid_prompt_completion.jsonl"),
                     output_dir=str(output_dir), model=_model(model_dir), device="cpu", progress_bar=False, **kwargs)


def test_a_file_in_place_of_the_output_dir(model_dir, tmp_path, no_data_reading):
    (tmp_path / "taken").write_text("not a directory")
    with pytest.raises(FileExistsError, match="output_dir=.*taken is a file; choose a directory path"):
        _customize(model_dir, tmp_path / "taken")
    with pytest.raises(FileExistsError, match=r"has a file on its path \(.*taken\)"):
        _customize(model_dir, tmp_path / "taken" / "job")


@root_ignores_permissions
def test_unwritable_output_dir(model_dir, tmp_path, no_data_reading):
    parent = tmp_path / "readonly"
    parent.mkdir()
    parent.chmod(0o500)
    try:
        with pytest.raises(PermissionError, match="cannot be created: .*readonly is not writable"):
            _customize(model_dir, parent / "job")
        assert not (parent / "job").exists()
    finally:
        parent.chmod(0o700)


def test_unwritable_output_dir_as_seen_by_os_access(model_dir, tmp_path, monkeypatch, no_data_reading):
    """The same check where the tests run as root (which ignores permissions): os.access says no."""
    from nemo_customizer import jobs

    parent = tmp_path / "readonly"
    parent.mkdir()
    monkeypatch.setattr(jobs.os, "access", lambda path, mode: Path(path) != parent.resolve())
    with pytest.raises(PermissionError, match="cannot be created: .*readonly is not writable"):
        _customize(model_dir, parent / "job")
    assert not (parent / "job").exists()


def test_disk_full_is_refused_before_data_or_model(model_dir, tmp_path, monkeypatch, no_data_reading, capsys):
    from nemo_customizer import cli, jobs

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(jobs.shutil, "disk_usage", lambda path: usage(2**40, 2**40 - 2**20, 2**20))
    with pytest.raises(jobs.OutputDirError, match=r"its disk has 0.00 GiB free, the job needs at least 0.25 GiB"):
        _customize(model_dir, tmp_path / "job")
    assert cli.main(_cli_args(model_dir, CORPUS / "valid_prompt_completion.jsonl", tmp_path / "job")) == 2
    assert capsys.readouterr().err.startswith("error: output_dir=")
    assert not (tmp_path / "job").exists()


def test_job_directory_create_checks_again_and_leaves_nothing(tmp_path, monkeypatch):
    from nemo_customizer import jobs
    from nemo_customizer.config import compose_config

    cfg = compose_config(["model=tiny-llama-test", "dataset.path=x.jsonl"])
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(jobs.shutil, "disk_usage", lambda path: usage(2**40, 2**40, 0))
    with pytest.raises(jobs.OutputDirError):
        jobs.JobDirectory.create(str(tmp_path / "a" / "job"), cfg)
    assert not (tmp_path / "a").exists()


def test_full_weight_exports_need_room_for_the_model():
    from nemo_customizer.config import compose_config, num_parameters
    from nemo_customizer.jobs import MIN_FREE_BYTES, required_free_bytes

    lora = compose_config(["model=tiny-llama-test", "dataset.path=x.jsonl"])
    full = compose_config(["model=tiny-llama-test", "dataset.path=x.jsonl",
                           "hyperparameters.finetuning_type=all_weights"])
    merged = compose_config(["model=tiny-llama-test", "dataset.path=x.jsonl",
                             "hyperparameters.finetuning_type=lora_merged"])
    no_checkpoints = compose_config(["model=tiny-llama-test", "dataset.path=x.jsonl",
                                     "hyperparameters.finetuning_type=all_weights", "checkpoint.enabled=false"])
    n = num_parameters(full.model.architecture)
    assert required_free_bytes(lora) == required_free_bytes(None) == MIN_FREE_BYTES
    assert required_free_bytes(merged) == required_free_bytes(no_checkpoints) == MIN_FREE_BYTES + 2 * n
    # all_weights with checkpoints: also the kept checkpoint plus the one being written, 14 bytes/parameter each
    # (bf16 weights, fp32 master weights and two fp32 Adam moments), 12 in fp32
    assert required_free_bytes(full) == MIN_FREE_BYTES + 2 * n + 2 * 14 * n
    fp32_keep3 = compose_config(["model=tiny-llama-test", "dataset.path=x.jsonl", "precision=fp32",
                                 "hyperparameters.finetuning_type=all_weights", "checkpoint.keep_last=3"])
    assert required_free_bytes(fp32_keep3) == MIN_FREE_BYTES + 2 * n + 4 * 12 * n
    bf16_weights = compose_config(["model=tiny-llama-test", "dataset.path=x.jsonl", "precision=bf16",
                                   "hyperparameters.finetuning_type=all_weights",
                                   "hyperparameters.fp32_master_weights=false"])
    assert required_free_bytes(bf16_weights) == MIN_FREE_BYTES + 2 * n + 2 * 6 * n  # bf16 weights and moments


def test_a_full_fine_tune_without_room_for_its_checkpoints_is_refused_with_what_to_change(tmp_path, monkeypatch):
    from collections import namedtuple

    from nemo_customizer import jobs
    from nemo_customizer.config import compose_config

    cfg = compose_config(["model=llama-3.1-8b-instruct", "dataset.path=x.jsonl",
                          "hyperparameters.finetuning_type=all_weights"])
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(jobs.shutil, "disk_usage", lambda path: usage(2**40, 2**40 - 100 * 2**30, 100 * 2**30))
    with pytest.raises(jobs.OutputDirError, match=r"its disk has 100.00 GiB free, the job needs at least 2\d\d\.\d\d "
                                                  r"GiB \(most of it for full-weight resumable checkpoints: lower "
                                                  r"checkpoint.keep_last or set checkpoint.enabled=false\)"):
        jobs.check_output_dir(str(tmp_path / "job"), cfg)
    cfg.checkpoint.enabled = False
    jobs.check_output_dir(str(tmp_path / "job"), cfg)  # 8B weights alone (~15 GiB) fit
    # A job being resumed already holds checkpoints that new ones replace: that space counts as free
    cfg.checkpoint.enabled = True
    (tmp_path / "job" / "checkpoints").mkdir(parents=True)
    with open(tmp_path / "job" / "checkpoints" / "shard", "wb") as handle:
        handle.truncate(200 * 2**30)  # sparse: a 200 GiB file that takes no real space
    jobs.check_output_dir(str(tmp_path / "job"), cfg)


def test_output_dir_checks_pass_for_a_new_nested_directory(tmp_path):
    from nemo_customizer.jobs import check_output_dir

    check_output_dir(str(tmp_path / "a" / "b" / "job"))  # created later by the job, not by the check
    assert not (tmp_path / "a").exists()


def test_token_ids_beyond_the_model_vocabulary_are_a_config_error(model_dir, tmp_path, monkeypatch):
    """A tokenizer whose ids the checkpoint's embedding does not cover (here: one id past the tiny model's 320):
    named before any model is built (on a GPU it would be a device-side assert mid-step, or garbage read by the loss
    kernel)."""
    from nemo_customizer import data
    from nemo_customizer.api import customize
    from nemo_customizer.config import ConfigError
    from nemo_customizer.data.examples import TokenizedExample

    real = data.tokenize_examples

    def with_an_unknown_token(examples, tokenizer, max_seq_length):
        tokenized, stats = real(examples, tokenizer, max_seq_length)
        first = tokenized[0]
        return [TokenizedExample(first.input_ids[:-1] + [320], first.loss_mask)] + tokenized[1:], stats

    monkeypatch.setattr(data, "tokenize_examples", with_an_unknown_token)
    job = tmp_path / "job"
    with pytest.raises(ConfigError, match=r"produced token id 320, but model tiny-llama-test has vocab_size 320"):
        customize("tiny-llama-test", dataset=str(CORPUS / "valid_prompt_completion.jsonl"), output_dir=str(job),
                  model=_model(model_dir), device="cpu", progress_bar=False)
    assert not job.exists()
