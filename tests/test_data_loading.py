"""Dataset discovery, row validation (every error case names file, line and field) and the seeded split."""

import json
from pathlib import Path

import pytest

from nemo_customizer.data import DatasetError, PromptCompletion, discover_files, load_dataset
from nemo_customizer.data.split import num_val_rows, split_rows

PC_HINT = 'Each line must be a JSON object {"prompt": str, "completion": str}.'


def write_rows(path: Path, n: int, start: int = 0) -> Path:
    path.write_text("".join(json.dumps({"prompt": f"p{i}", "completion": f"c{i}"}) + "\n"
                            for i in range(start, start + n)))
    return path


def load_error(path: Path, **kwargs) -> str:
    with pytest.raises(DatasetError) as info:
        load_dataset(path, **kwargs)
    return str(info.value)


# --- discovery ---------------------------------------------------------------------------------------------------

def test_single_file_is_the_training_file(tmp_path):
    f = write_rows(tmp_path / "anything.jsonl", 3)
    files = discover_files(f)
    assert files.train == (f,) and files.val == ()


def test_directory_splits_sorted_and_other_files_ignored(tmp_path):
    for name in ["train_b.jsonl", "training.jsonl", "train_a.jsonl", "val.jsonl", "Validation_2.JSONL", "test.jsonl"]:
        write_rows(tmp_path / name, 1)
    (tmp_path / "notes.txt").write_text("not data")
    files = discover_files(tmp_path)
    assert [p.name for p in files.train] == ["train_a.jsonl", "train_b.jsonl", "training.jsonl"]
    assert [p.name for p in files.val] == ["Validation_2.JSONL", "val.jsonl"]
    assert [p.name for p in files.ignored] == ["test.jsonl"]


def test_single_unnamed_jsonl_is_training(tmp_path):
    write_rows(tmp_path / "data.jsonl", 2)
    write_rows(tmp_path / "validation.jsonl", 1)
    files = discover_files(tmp_path)
    assert [p.name for p in files.train] == ["data.jsonl"]
    assert [p.name for p in files.val] == ["validation.jsonl"]


def test_ambiguous_directory_lists_found_and_expected_names(tmp_path):
    write_rows(tmp_path / "a.jsonl", 1)
    write_rows(tmp_path / "b.jsonl", 1)
    with pytest.raises(DatasetError) as info:
        discover_files(tmp_path)
    message = str(info.value)
    assert str(tmp_path) in message and "a.jsonl, b.jsonl" in message
    assert "training*.jsonl" in message and "validation*.jsonl" in message


def test_directory_without_jsonl(tmp_path):
    (tmp_path / "readme.md").write_text("hi")
    message = load_error(tmp_path)
    assert "no training file" in message and "no *.jsonl files" in message and "train*.jsonl" in message


def test_only_validation_file_is_not_enough(tmp_path):
    write_rows(tmp_path / "val.jsonl", 3)
    assert "no training file (found: val.jsonl)" in load_error(tmp_path)


def test_missing_path(tmp_path):
    message = load_error(tmp_path / "nope.jsonl")
    assert f"{tmp_path / 'nope.jsonl'}: dataset path does not exist." in message


def test_several_training_files_are_concatenated_in_name_order(tmp_path):
    write_rows(tmp_path / "train_2.jsonl", 2, start=10)
    write_rows(tmp_path / "train_1.jsonl", 2, start=0)
    write_rows(tmp_path / "val.jsonl", 1, start=100)
    splits = load_dataset(tmp_path)
    assert [e.prompt for e in splits.train] == ["p0", "p1", "p10", "p11"]
    assert splits.train[2].origin == f"{tmp_path / 'train_2.jsonl'}:1"
    assert [e.prompt for e in splits.val] == ["p100"] and splits.val_source == "validation files"
    assert "train_1.jsonl" in splits.describe() and "val.jsonl" in splits.describe()


# --- row validation ----------------------------------------------------------------------------------------------

def test_valid_rows_extra_keys_blank_lines_and_bom(tmp_path):
    f = tmp_path / "train.jsonl"
    f.write_bytes(b'\xef\xbb\xbf{"prompt": "Q: 2+2?", "completion": " 4", "id": 7}\n\n  \n'
                  + '{"prompt": "caf\u00e9", "completion": "ok"}\r\n'.encode())
    splits = load_dataset(f, val_fraction=0.0)
    assert splits.format == "prompt_completion"
    assert splits.train == [PromptCompletion("Q: 2+2?", " 4", f"{f}:1"), PromptCompletion("caf\u00e9", "ok", f"{f}:4")]
    assert splits.val == []


def test_error_message_names_file_line_field_and_fix(tmp_path):
    f = tmp_path / "train.jsonl"
    f.write_text('{"prompt": "a", "completion": "b"}\n' * 16 + '{"prompt": "a", "completion": 3}\n')
    assert load_error(f) == f'{f}:17: field "completion" must be a string, got int (value 3). {PC_HINT}'


@pytest.mark.parametrize(
    "content, expected",
    [
        (b'{"prompt": "a", "completion": "b"}\n{"prompt": "a",\n', ":2: invalid JSON"),
        (b'[1, 2]\n', ":1: row must be a JSON object, got list"),
        (b'"just text"\n', ":1: row must be a JSON object, got str"),
        (b'{"prompt": "a"}\n', ':1: field "completion" is missing (keys found: "prompt")'),
        (b'{"completion": "a", "text": 1}\n', ':1: field "prompt" is missing (keys found: "completion", "text")'),
        (b'{"prompt": null, "completion": "b"}\n', ':1: field "prompt" must be a string, got null (value null)'),
        (b'{"prompt": ["x"], "completion": "b"}\n', ':1: field "prompt" must be a string, got list (value ["x"])'),
        (b'{"prompt": "a", "completion": ""}\n', ':1: field "completion" is empty'),
        (b'{"prompt": " \\n", "completion": "b"}\n', ':1: field "prompt" is empty'),
        (b'\n\n{"prompt": "a", "completion": true}\n', ':3: field "completion" must be a string, got bool'),
        (b'{"prompt": "a", "completion": "b"}\n{"prompt": "a", "completion": "b"}\n{"prompt": "\xff"}\n',
         ":3: bytes are not valid UTF-8 (byte 0xff at column 13)"),
    ],
)
def test_row_errors(tmp_path, content, expected):
    f = tmp_path / "train.jsonl"
    f.write_bytes(content)
    message = load_error(f)
    assert message.startswith(f"{f}{expected}"), message
    assert message.count(str(f)) == 1  # one problem, reported once


@pytest.mark.parametrize("content", [b"", b"\n  \n\n"])
def test_empty_file(tmp_path, content):
    f = tmp_path / "train.jsonl"
    f.write_bytes(content)
    assert load_error(f).startswith(f"{f}: file is empty (no rows).")


def test_utf16_file(tmp_path):
    f = tmp_path / "train.jsonl"
    f.write_bytes('{"prompt": "a", "completion": "b"}\n'.encode("utf-16"))
    assert load_error(f).startswith(f"{f}: file is UTF-16 encoded. Save the file as UTF-8")


def test_many_errors_are_reported_together_and_capped(tmp_path):
    f = tmp_path / "train.jsonl"
    f.write_text('{"prompt": "a", "completion": "b"}\n' + '{"prompt": 1, "completion": "b"}\n' * 15)
    message = load_error(f)
    lines = message.splitlines()
    assert lines[0] == "15 problems in the dataset:"
    assert lines[1] == f'  {f}:2: field "prompt" must be a string, got int (value 1).'
    assert lines[10] == f'  {f}:11: field "prompt" must be a string, got int (value 1).'
    assert lines[11] == "  ... and 5 more"
    assert lines[12] == PC_HINT and len(lines) == 13


def test_errors_from_train_and_validation_files_are_collected(tmp_path):
    (tmp_path / "train.jsonl").write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "a"}\n')
    (tmp_path / "val.jsonl").write_text('not json\n')
    message = load_error(tmp_path)
    assert message.startswith("2 problems in the dataset:")
    assert f'{tmp_path / "train.jsonl"}:2: field "completion" is missing' in message
    assert f'{tmp_path / "val.jsonl"}:1: invalid JSON' in message


# --- seeded validation split ---------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "n_rows, fraction, expected",
    [(100, 0.1, 10), (19, 0.1, 2), (5, 0.1, 1), (2, 0.1, 1), (2, 0.9, 1), (1, 0.1, 0), (0, 0.1, 0), (50, 0.0, 0)],
)
def test_num_val_rows(n_rows, fraction, expected):
    assert num_val_rows(n_rows, fraction) == expected


@pytest.mark.parametrize("fraction", [-0.1, 1.0])
def test_bad_val_fraction(tmp_path, fraction):
    with pytest.raises(ValueError):
        num_val_rows(10, fraction)
    with pytest.raises(ValueError, match="val_fraction"):
        load_dataset(write_rows(tmp_path / "train.jsonl", 3), val_fraction=fraction)


def test_seeded_split_is_deterministic_disjoint_and_covering(tmp_path):
    f = write_rows(tmp_path / "train.jsonl", 100)
    a = load_dataset(f, val_fraction=0.1, seed=1)
    b = load_dataset(f, val_fraction=0.1, seed=1)
    c = load_dataset(f, val_fraction=0.1, seed=2)
    assert a.train == b.train and a.val == b.val
    assert a.val != c.val
    train, val = {e.prompt for e in a.train}, {e.prompt for e in a.val}
    assert len(val) == 10 and not train & val and train | val == {f"p{i}" for i in range(100)}
    assert [e.prompt for e in a.val] == sorted((e.prompt for e in a.val), key=lambda p: int(p[1:]))  # file order
    assert "seeded split (10% of training rows, seed 1)" in a.describe()


def test_split_rows_depends_only_on_count_fraction_and_seed():
    assert split_rows(list(range(10)), 0.3, seed=0) == split_rows(list(range(10)), 0.3, seed=0)
    train, val = split_rows(list("abcdefghij"), 0.3, seed=0)
    assert len(val) == 3 and sorted(train + val) == list("abcdefghij")


def test_max_val_examples_caps_validation(tmp_path):
    f = write_rows(tmp_path / "train.jsonl", 100)
    splits = load_dataset(f, val_fraction=0.5, seed=0, max_val_examples=7)
    assert len(splits.val) == 7 and len(splits.train) == 50
    assert splits.val == load_dataset(f, val_fraction=0.5, seed=0, max_val_examples=7).val

