"""Data where users keep it: JSON, CSV/TSV, Parquet, Arrow and save_to_disk folders read into the same examples as the
equivalent JSONL; dataset.columns; Alpaca, ShareGPT and plain text rows; mixing weights; errors naming rows; a Hub
dataset ID offline. No test touches the network."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from nemo_customizer.config import ConfigError, compose_config, config_from_kwargs, validate_config
from nemo_customizer.config.schema import ColumnsConfig
from nemo_customizer.data import DatasetError, DatasetSource, load_dataset, load_mixture
from nemo_customizer.data.columns import FIELDS
from nemo_customizer.data.formats import Conversation, PromptCompletion
from nemo_customizer.data.from_config import dataset_sources
from nemo_customizer.data.hf_datasets import is_hub_id
from nemo_customizer.data.mixing import mix_rows, mixture_counts
from nemo_customizer.data.shapes import ALPACA_PROMPT, ALPACA_PROMPT_NO_INPUT

REPO = Path(__file__).resolve().parents[1]
ROWS = [{"prompt": f"Q{i}: caf\u00e9, \"quoted\", a\nsecond line", "completion": f" {i:03d}"} for i in range(12)]
ROWS[3]["completion"] = "NA"  # a CSV reader that guesses types would make this null
CHAT = [
    {"messages": [{"role": "user", "content": "weather in Paris?"},
                  {"role": "assistant", "content": None, "tool_calls": [
                      {"type": "function", "function": {"name": "weather", "arguments": "{\"city\": \"Paris\"}"}}]},
                  {"role": "tool", "content": "sunny"},
                  {"role": "assistant", "content": "Sunny."}],
     "tools": [{"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}]},
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
                  {"role": "assistant", "content": "hello"}]},
]


def write_jsonl(path: Path, rows: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    return path


def write_csv(path: Path, rows: list[dict], delimiter: str = ",") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]), delimiter=delimiter)
        writer.writeheader()
        writer.writerows(rows)
    return path


def write_table(path: Path, rows: list[dict]) -> Path:
    """``.parquet``, ``.arrow`` (Arrow IPC file format) or ``.stream.arrow`` (the stream format datasets writes)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pylist(rows)
    if path.suffix == ".parquet":
        pq.write_table(table, path)
    else:
        new = pa.ipc.new_stream if path.name.endswith(".stream.arrow") else pa.ipc.new_file
        with pa.OSFile(str(path), "wb") as sink, new(sink, table.schema) as writer:
            writer.write_table(table)
    return path


def writers():
    return {
        "json_array": lambda d, rows: write_json_array(d / "train.json", rows),
        "json_lines": lambda d, rows: write_jsonl(d / "train.json", rows),
        "csv": lambda d, rows: write_csv(d / "train.csv", rows),
        "tsv": lambda d, rows: write_csv(d / "train.tsv", rows, delimiter="\t"),
        "parquet": lambda d, rows: write_table(d / "train.parquet", rows),
        "arrow_file": lambda d, rows: write_table(d / "train.arrow", rows),
        "arrow_stream": lambda d, rows: write_table(d / "train.stream.arrow", rows),
        "save_to_disk": lambda d, rows: save_to_disk(d, rows),
    }


def write_json_array(path: Path, rows: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rows, ensure_ascii=False, indent=2), encoding="utf-8")
    return path


def save_to_disk(path: Path, rows: list | dict[str, list]) -> Path:
    import datasets

    if isinstance(rows, dict):
        datasets.DatasetDict({name: datasets.Dataset.from_list(r) for name, r in rows.items()}).save_to_disk(str(path))
    else:
        datasets.Dataset.from_list(rows).save_to_disk(str(path))
    return path


def contents(examples: list) -> list:
    """Examples without where they came from."""
    return [(e.prompt, e.completion) if isinstance(e, PromptCompletion)
            else (e.messages, e.tools) if isinstance(e, Conversation)
            else (e.prompt, e.chosen, e.rejected, e.tools) for e in examples]


def load_error(path, **kwargs) -> str:
    with pytest.raises(DatasetError) as info:
        load_dataset(path, **kwargs)
    return str(info.value)


# --- every file type reads like JSONL --------------------------------------------------------------------------------

ORIGINS = {"json_array": "train.json row 5", "json_lines": "train.json:5", "csv": "train.csv:10",
           "tsv": "train.tsv:10", "parquet": "train.parquet row 5", "arrow_file": "train.arrow row 5",
           "arrow_stream": "train.stream.arrow row 5", "save_to_disk": "save_to_disk row 5"}


@pytest.mark.parametrize("kind", sorted(ORIGINS))
def test_each_file_type_gives_the_examples_of_the_equivalent_jsonl(tmp_path, kind):
    expected = load_dataset(write_jsonl(tmp_path / "jsonl" / "train.jsonl", ROWS), val_fraction=0.0)
    path = writers()[kind](tmp_path / kind, ROWS)
    for target in (path,) if kind == "save_to_disk" else (path, path.parent):  # the file, and its directory
        splits = load_dataset(target, val_fraction=0.0)
        assert splits.format == "prompt_completion" and contents(splits.train) == contents(expected.train)
        # each row is located as file:line (text files) or "row N"; a CSV record of two lines starts on line 2N
        assert splits.train[4].origin.endswith(ORIGINS[kind]), splits.train[4].origin


def test_the_held_out_split_of_any_type_is_the_one_jsonl_gets(tmp_path):
    expected = load_dataset(write_jsonl(tmp_path / "a" / "train.jsonl", ROWS), val_fraction=0.25, seed=3)
    splits = load_dataset(write_table(tmp_path / "b" / "train.parquet", ROWS), val_fraction=0.25, seed=3)
    assert contents(splits.train) == contents(expected.train) and contents(splits.val) == contents(expected.val)


@pytest.mark.parametrize("kind", ["parquet", "save_to_disk", "json_array"])
def test_chat_rows_with_tool_calls_read_like_jsonl(tmp_path, kind):
    """Arrow gives every message the keys of all of them (tool_calls: null on plain messages); those nulls go."""
    expected = load_dataset(write_jsonl(tmp_path / "train.jsonl", CHAT), val_fraction=0.0)
    splits = load_dataset(writers()[kind](tmp_path / kind, CHAT), val_fraction=0.0)
    assert splits.format == "chat" and contents(splits.train) == contents(expected.train)


def test_a_directory_mixes_file_types_and_validation_files(tmp_path):
    write_table(tmp_path / "d" / "train-00000-of-00002.parquet", ROWS[:6])  # the Hub's Parquet file names
    write_table(tmp_path / "d" / "train-00001-of-00002.parquet", ROWS[6:10])
    write_csv(tmp_path / "d" / "validation.csv", ROWS[10:])
    write_jsonl(tmp_path / "d" / "test.jsonl", ROWS[:1])
    splits = load_dataset(tmp_path / "d")
    assert contents(splits.train) == contents(load_dataset(write_jsonl(tmp_path / "t.jsonl", ROWS[:10]),
                                                           val_fraction=0.0).train)
    assert len(splits.val) == 2 and splits.val_source == "validation files"
    assert "validation.csv" in splits.describe() and "ignored: " in splits.describe()


def test_saved_dataset_dict_splits_by_name_or_as_configured(tmp_path):
    folder = save_to_disk(tmp_path / "saved", {"train": ROWS[:8], "validation": ROWS[8:10], "test": ROWS[10:]})
    splits = load_dataset(folder)
    assert (len(splits.train), len(splits.val), splits.val_source) == (8, 2, "validation split")
    assert splits.train[0].origin == f"{folder} split train row 1"
    assert f"ignored: {folder} split test" in splits.describe()

    odd = save_to_disk(tmp_path / "odd", {"train_sft": ROWS[:8], "train_gen": ROWS[:2], "test_sft": ROWS[8:]})
    message = load_error(odd)
    assert "several splits could be the training split (its splits: train_sft, train_gen, test_sft)" in message
    assert "dataset.train_split" in message
    splits = load_dataset(odd, train_split="train_sft", val_split="test_sft")
    assert (len(splits.train), len(splits.val)) == (8, 4)
    assert "cannot use split 'dev' for validation: it is not one (its splits: train_sft, train_gen, test_sft)" in \
        load_error(odd, train_split="train_sft", val_split="dev")
    assert "cannot use split 'train_sft' for validation: it is the training split" in load_error(
        odd, train_split="train_sft", val_split="train_sft")
    assert "this dataset is files" in load_error(write_jsonl(tmp_path / "f.jsonl", ROWS), train_split="train")


# --- dataset.columns -------------------------------------------------------------------------------------------------

def test_columns_map_the_users_names_onto_ours(tmp_path):
    renamed = [{"question": r["prompt"], "answer": r["completion"], "prompt": "ignored"} for r in ROWS]
    for path in (write_jsonl(tmp_path / "q.jsonl", renamed), write_table(tmp_path / "q.parquet", renamed)):
        splits = load_dataset(path, val_fraction=0.0, columns={"prompt": "question", "completion": "answer"})
        assert contents(splits.train) == [(r["prompt"], r["completion"]) for r in ROWS]
        assert not splits.verbatim and "columns mapped: prompt=question, completion=answer" in splits.describe()


def test_columns_make_chat_and_preference_rows(tmp_path):
    chat = write_jsonl(tmp_path / "chat.jsonl", [{"conversation": row["messages"]} for row in CHAT[1:]])
    assert load_dataset(chat, val_fraction=0.0, columns={"messages": "conversation"}).format == "chat"
    pairs = write_table(tmp_path / "pairs.parquet", [{"q": "2+2?", "good": "4", "bad": "5"}])
    splits = load_dataset(pairs, val_fraction=0.0, columns={"prompt": "q", "chosen": "good", "rejected": "bad"})
    assert splits.format == "preference" and contents(splits.train) == [("2+2?", "4", "5", None)]


def test_a_mapped_column_the_data_lacks_is_named_with_the_columns_found(tmp_path):
    f = write_jsonl(tmp_path / "train.jsonl", [{"question": "a", "answer": "b"}] * 3)
    message = load_error(f, columns={"prompt": "question", "completion": "reply"})
    assert message.startswith(f'{f}:1: column "reply" (mapped to completion) is missing (keys found: "question", '
                              f'"answer").')  # reported once for the file, not once per row
    assert "dataset.columns.FIELD=COLUMN" in message
    with pytest.raises(ValueError, match="cannot map columns onto promt"):
        load_dataset(f, columns={"promt": "question"})


def test_columns_config_is_typed_and_checked_before_any_data_is_read(tmp_path):
    assert [f for f in ColumnsConfig.__dataclass_fields__] == list(FIELDS)
    cfg = compose_config([f"dataset.path={tmp_path}", "dataset.columns.prompt=question",
                          "dataset.columns.completion=answer"])
    assert [(s.columns, s.weight) for s in dataset_sources(cfg.dataset)] == [
        ({"prompt": "question", "completion": "answer"}, 1.0)]
    with pytest.raises(ConfigError, match=r"unknown config key 'dataset.columns.promt' \(did you mean 'prompt'\?\)"):
        compose_config(["dataset.path=d", "dataset.columns.promt=question"])
    with pytest.raises(ConfigError, match="dataset.columns.prompt is empty: name the column"):
        validate_config(config_from_kwargs(dataset={"path": "d", "columns": {"prompt": " "}}))


# --- Alpaca, ShareGPT and plain text rows ----------------------------------------------------------------------------

ALPACA = [{"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
          {"instruction": "Name a colour.", "input": "", "output": "Blue."},
          {"instruction": "Say hi.", "output": "Hi!"}]


@pytest.mark.parametrize("kind", ["jsonl", "json_array", "parquet"])
def test_alpaca_rows_become_prompt_completion_rows_with_alpacas_template(tmp_path, kind):
    path = (write_jsonl(tmp_path / "alpaca.jsonl", ALPACA) if kind == "jsonl"
            else writers()[kind](tmp_path / kind, ALPACA))
    splits = load_dataset(path, val_fraction=0.0)
    assert splits.format == "prompt_completion"
    assert contents(splits.train) == [
        ("Below is an instruction that describes a task, paired with an input that provides further context. Write a "
         "response that appropriately completes the request.\n\n### Instruction:\nAdd the numbers.\n\n### Input:\n"
         "2 and 3\n\n### Response:\n", "5"),
        (ALPACA_PROMPT_NO_INPUT.format(instruction="Name a colour."), "Blue."),
        (ALPACA_PROMPT_NO_INPUT.format(instruction="Say hi."), "Hi!")]
    assert ALPACA_PROMPT.format(instruction="Add the numbers.", input="2 and 3") == splits.train[0].prompt
    assert "Alpaca rows -> prompt_completion" in splits.describe()


def test_alpaca_row_problems_name_alpacas_fields(tmp_path):
    f = write_jsonl(tmp_path / "train.jsonl", [ALPACA[0], {"instruction": "x", "input": 3, "response": "y"},
                                               {"prompt": "p", "completion": "c"}])
    lines = load_error(f).splitlines()
    assert lines[1:5] == [f'  {f}:2: field "output" is missing (keys found: "instruction", "input", "response").',
                          f'  {f}:2: field "input" must be a string or null, got int (value 3).',
                          f'  {f}:3: field "instruction" is missing (keys found: "prompt", "completion").',
                          f'  {f}:3: field "output" is missing (keys found: "prompt", "completion").']
    assert "Alpaca rows {\"instruction\": str" in lines[5] and "dataset.columns" in lines[5]
    g = write_jsonl(tmp_path / "g.jsonl", [ROWS[0], ALPACA[0]])
    assert load_error(g) == (f"{g}:2: row is alpaca data but this file's first row is prompt_completion data. Keep "
                             "one shape of row per file: put Alpaca rows and prompt/completion rows in separate files.")


SHAREGPT = [{"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}],
             "system": "Be brief."},
            {"conversations": [{"from": "system", "value": "S"}, {"from": "human", "value": "2+2?"},
                               {"from": "gpt", "value": "4"}, {"from": "human", "value": "and 3+3?"},
                               {"from": "gpt", "value": "6"}]},
            {"conversations": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}]


@pytest.mark.parametrize("kind", ["jsonl", "parquet"])
def test_sharegpt_rows_become_chat_rows(tmp_path, kind):
    path = (write_jsonl(tmp_path / "sg.jsonl", SHAREGPT) if kind == "jsonl"
            else write_table(tmp_path / "sg.parquet", SHAREGPT))
    splits = load_dataset(path, val_fraction=0.0)
    assert splits.format == "chat"
    assert [list(e.messages) for e in splits.train] == [
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
         {"role": "assistant", "content": "hello"}],
        [{"role": "system", "content": "S"}, {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"},
         {"role": "user", "content": "and 3+3?"}, {"role": "assistant", "content": "6"}],
        [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]]


def test_sharegpt_row_problems_name_the_turn(tmp_path):
    f = write_jsonl(tmp_path / "train.jsonl", [
        {"conversations": [{"from": "human", "value": "hi"}, {"from": "function_call", "value": "{}"}]},
        {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": 5}]},
        {"conversations": [{"from": "gpt", "value": "hello"}, {"from": "human", "value": "bye"}]}])
    message = load_error(f)
    assert f'{f}:1: field "conversations[1].from" must be one of "system", "human", "gpt" (got "function_call")' \
        in message
    assert f'{f}:2: field "conversations[1].value" must be a string (got int)' in message
    assert f'{f}:3: field "messages[0].role" is "assistant" but the conversation must start with a user' in message
    assert "ShareGPT rows" in message and "the last turn must be from gpt" in message


@pytest.mark.parametrize("kind", ["jsonl", "parquet", "csv"])
def test_plain_text_rows_are_refused_naming_the_shape_and_what_to_do(tmp_path, kind):
    rows = [{"text": "### Human: hi ### Assistant: hello"}] * 3
    path = write_jsonl(tmp_path / "t.jsonl", rows) if kind == "jsonl" else writers()[kind](tmp_path / kind, rows)
    message = load_error(path)
    assert ('rows are plain text (a "text" field without prompt and completion): training on raw text (continued '
            "pretraining) is not supported.") in message
    assert '{"prompt": str, "completion": str}' in message and "dataset.columns" in message
    assert message.count("plain text") == 1  # once for the file, not once per row


def test_a_plain_text_row_in_a_prompt_completion_file(tmp_path):
    f = write_jsonl(tmp_path / "train.jsonl", [ROWS[0], {"text": "raw"}])
    assert load_error(f).startswith(f'{f}:2: rows are plain text (a "text" field without prompt and completion)')


# --- mixing weights --------------------------------------------------------------------------------------------------

def test_mixture_counts_are_the_weights_shares_of_all_training_rows():
    assert mixture_counts([100, 50], [0.7, 0.3]) == [105, 45]
    assert mixture_counts([100, 50], [7, 3]) == mixture_counts([100, 50], [0.7, 0.3])  # only the ratio counts
    assert mixture_counts([10, 10, 10], [1, 1, 1]) == [10, 10, 10]
    assert mixture_counts([3, 3, 4], [1, 1, 1]) == [4, 3, 3]  # 10 rows: the largest remainder goes first
    with pytest.raises(ValueError, match="positive and finite"):
        mixture_counts([1, 2], [1, 0])


def test_mixed_rows_are_subsets_or_repeats_drawn_by_seed():
    a, b = [f"a{i}" for i in range(100)], [f"b{i}" for i in range(50)]
    mixed = mix_rows([a, b], [0.3, 0.7], seed=1)  # a gives 45 of its 100 rows, b all its 50 once and 55 more
    from_a, from_b = [r for r in mixed if r[0] == "a"], [r for r in mixed if r[0] == "b"]
    assert len(from_a) == 45 and len(set(from_a)) == 45 and from_a == sorted(from_a, key=lambda r: int(r[1:]))
    assert len(from_b) == 105 and set(from_b) == set(b) and max(from_b.count(r) for r in b) == 3
    assert mix_rows([a, b], [0.3, 0.7], seed=1) == mixed
    assert mix_rows([a, b], [0.3, 0.7], seed=2) != mixed
    assert mix_rows([a], [5.0], seed=1) == a  # one source: its rows, once, in order


def test_load_mixture_draws_training_rows_and_keeps_each_sources_validation(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [{"prompt": f"a{i}", "completion": "x"} for i in range(100)])
    write_table(tmp_path / "b" / "train.parquet", [{"prompt": f"b{i}", "completion": "y"} for i in range(40)])
    write_jsonl(tmp_path / "b" / "validation.jsonl", [{"prompt": "bv", "completion": "y"}])
    sources = [DatasetSource(a, weight=0.5), DatasetSource(tmp_path / "b", weight=0.5)]
    mixed = load_mixture(sources, val_fraction=0.1, seed=7)
    train = [e.prompt for e in mixed.train]
    assert len(train) == 130 and sum(p.startswith("a") for p in train) == 65  # 90 + 40 rows, half each
    assert sorted(e.prompt for e in mixed.val if e.prompt.startswith("a")) == sorted(
        e.prompt for e in load_dataset(a, val_fraction=0.1, seed=7).val)  # a's own seeded hold-out...
    assert not {e.prompt for e in mixed.val} & set(train)  # ... never trained on
    assert [e.prompt for e in mixed.val][-1] == "bv" and len(mixed.val) == 11  # b's validation file, unweighted
    assert [e.prompt for e in load_mixture(sources, val_fraction=0.1, seed=7).train] == train
    text = mixed.describe()
    assert "mixture of 2 datasets" in text and "-> 65 of its 90 training rows" in text
    assert "-> 65 of its 40 training rows (repeated)" in text
    assert len(load_mixture(sources, val_fraction=0.1, seed=7, max_val_examples=4).val) == 4


def test_one_source_mixture_is_load_dataset(tmp_path):
    f = write_jsonl(tmp_path / "a.jsonl", ROWS)
    one, plain = load_mixture([DatasetSource(f, weight=3.0)], 0.25, 5), load_dataset(f, 0.25, 5)
    assert (one.train, one.val, one.describe()) == (plain.train, plain.val, plain.describe())


def test_mixed_sources_must_be_one_format(tmp_path):
    alpaca = write_jsonl(tmp_path / "alpaca.jsonl", ALPACA)
    chat = write_jsonl(tmp_path / "chat.jsonl", CHAT)
    pc = write_jsonl(tmp_path / "pc.jsonl", ROWS)
    assert load_mixture([DatasetSource(pc), DatasetSource(alpaca)]).format == "prompt_completion"
    with pytest.raises(DatasetError) as info:
        load_mixture([DatasetSource(alpaca), DatasetSource(chat)])
    assert str(info.value).startswith(f"{chat}: dataset.mix[1] is chat data but dataset.mix[0] ({alpaca}) is "
                                      "prompt_completion data.")
    assert "ShareGPT rows with chat rows" in str(info.value)


def test_mix_config_composes_and_is_checked(tmp_path):
    cfg = compose_config(["dataset.mix=[{path:data/a.jsonl,weight:0.7},{path:org/name,weight:0.3,"
                          "columns:{prompt:question}}]"])
    validate_config(cfg)
    assert [(m.path, m.weight, m.columns.prompt) for m in cfg.dataset.mix] == [("data/a.jsonl", 0.7, None),
                                                                               ("org/name", 0.3, "question")]
    same = config_from_kwargs(dataset={"mix": [{"path": "data/a.jsonl", "weight": 0.7},
                                               {"path": "org/name", "weight": 0.3, "columns": {"prompt": "question"}}]})
    assert same.dataset.mix == cfg.dataset.mix
    for dataset, words in [({"mix": [{"path": "a", "weight": 0}]}, "dataset.mix[0].weight must be a positive number"),
                           ({"mix": [{"weight": 1}]}, "dataset.mix[0].path is required"),
                           ({"path": "a", "mix": [{"path": "b"}]}, "dataset.path='a' and dataset.mix are both set"),
                           ({"mix": [{"path": "b"}], "columns": {"prompt": "q"}}, "set columns on each entry")]:
        with pytest.raises(ConfigError, match=words.replace("[", r"\[").replace("]", r"\]")):
            validate_config(config_from_kwargs(dataset=dataset))


def test_a_misspelled_key_in_a_mix_entry_is_named_by_its_full_path(tmp_path):
    """OmegaConf alone names the entry's key without its list prefix (``weigth``)."""
    from nemo_customizer.config import config_search

    full = r"unknown config key 'dataset\.mix\[1\]\.weigth' \(did you mean 'weight'\?\); valid keys under "
    with pytest.raises(ConfigError, match=full + r"'dataset\.mix\[1\]': path, weight, columns"):
        compose_config(["dataset.mix=[{path:a},{path:b,weigth:2}]"])
    with pytest.raises(ConfigError, match=full):
        config_from_kwargs(dataset={"mix": [{"path": "a"}, {"path": "b", "weigth": 2}]})
    with pytest.raises(ConfigError, match=r"'dataset\.mix\[0\]\.columns\.promt' \(did you mean 'prompt'\?\)"):
        compose_config(["dataset={mix:[{path:a,columns:{promt:q}}]}"])
    job = tmp_path / "job.yaml"
    job.write_text("dataset:\n  mix:\n    - path: a\n    - {path: b, weigth: 2}\n")
    with pytest.raises(ConfigError, match=full + rf".*\(in {job}\)\.$"):
        compose_config([], search=config_search(job))


def test_a_job_trains_on_a_mixture(model_dir, tmp_path, capsys):
    from nemo_customizer.api import customize

    a = write_jsonl(tmp_path / "a.jsonl", [{"prompt": f"yes {i}\nAnswer: ", "completion": "yes"} for i in range(12)])
    b = write_table(tmp_path / "b.parquet", [{"q": f"no {i}\nAnswer: ", "a": "no"} for i in range(6)])
    result = customize("tiny-llama-test", dataset={"mix": [{"path": str(a), "weight": 1.0},
                                                           {"path": str(b), "weight": 1.0,
                                                            "columns": {"prompt": "q", "completion": "a"}}]},
                       output_dir=str(tmp_path / "job"), model={"checkpoint": str(model_dir), "random_weights": False},
                       device="cpu", progress_bar=False,
                       hyperparameters={"epochs": 1, "batch_size": 8, "micro_batch_size": 8, "seed": 1})
    assert result.steps == 2  # 11 + 5 training rows, drawn half from each
    log = capsys.readouterr().err
    assert "mixture of 2 datasets" in log and "-> 8 of its 5 training rows (repeated)" in log
    assert "columns mapped: prompt=q, completion=a" in log


# --- errors name the row ---------------------------------------------------------------------------------------------

def test_errors_name_the_row_of_every_source_type(tmp_path):
    bad = [ROWS[0], {"prompt": None, "completion": "c"}, ROWS[1]]
    assert load_error(write_table(tmp_path / "t.parquet", bad)).startswith(
        f'{tmp_path / "t.parquet"} row 2: field "prompt" must be a string, got null (value null).')
    folder = save_to_disk(tmp_path / "saved", {"train": bad})
    assert load_error(folder).startswith(f'{folder} split train row 2: field "prompt" must be a string, got null')
    f = write_json_array(tmp_path / "a.json", [ROWS[0], ["not", "a", "row"]])
    assert load_error(f).startswith(f"{f} row 2: row must be a JSON object, got list")
    f.write_text('[\n  {"prompt": "a", "completion": "b"},\n  {"prompt": "a" "completion": "b"}\n]')
    assert load_error(f).startswith(f"{f}:3: invalid JSON: Expecting ',' delimiter (column 18).")
    f.write_text('[{"prompt": "a", "prompt": "b", "completion": "c"}]')
    assert 'key "prompt" appears twice in one object' in load_error(f)


def test_csv_problems_name_the_line(tmp_path):
    f = tmp_path / "train.csv"
    f.write_text('prompt,completion\n"a\nb",c\nx,y,z\n,e\n')
    lines = load_error(f).splitlines()
    assert lines[1:3] == [f"  {f}:4: record has 3 fields but the header has 2.",
                          f'  {f}:5: field "prompt" is empty.']
    f.write_text('prompt,completion\na,"b"c\n')
    assert load_error(f).startswith(f"{f}:2: not valid CSV: ',' expected after '\"'.")
    f.write_bytes(b"prompt,completion\na,b\ncaf\xe9,d\n")
    assert load_error(f).startswith(f"{f}:3: bytes are not valid UTF-8 (byte 0xe9 at column 4).")
    f.write_text("prompt,prompt\na,b\n")
    assert load_error(f).startswith(f'{f}:1: the header names column "prompt" twice.')
    f.write_text("prompt,completion\n")
    assert load_error(f).startswith(f"{f}: file is empty (no rows).")


def test_unreadable_table_files(tmp_path):
    for name, what in (("t.parquet", "Parquet"), ("t.arrow", "Arrow")):
        (tmp_path / name).write_bytes(b"PAR1 not really" if what == "Parquet" else b"not arrow")
        message = load_error(tmp_path / name)
        assert message.startswith(f"{tmp_path / name}: cannot read the file as {what}: "), message


def test_a_missing_extra_is_named(tmp_path, monkeypatch):
    path = write_table(tmp_path / "t.parquet", ROWS)
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # as if the [datasets] extra were not installed
    message = load_error(path)
    assert message.startswith(f"{path}: reading Parquet files needs the optional `datasets` extra, which is not "
                              "installed.")
    assert "pip install 'nemo_customizer[datasets]'" in message


def test_the_store_keeps_other_file_types_as_jsonl_rows(model_dir, tmp_path):
    from nemo_customizer import datasets as store

    path = write_table(tmp_path / "alpaca.parquet", ALPACA * 4)
    report = store.upload(path, "alpaca", model="tiny-llama-test", store_dir=tmp_path / "store",
                          model_overrides={"checkpoint": str(model_dir), "random_weights": False})
    stored = tmp_path / "store" / "alpaca"
    assert (report.format, report.training_rows) == ("prompt_completion", 12)
    assert contents(load_dataset(stored, val_fraction=0.0).train) == contents(load_dataset(path, val_fraction=0.0).train)


# --- Hub dataset IDs -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, hub", [("tatsu-lab/alpaca", True), ("HuggingFaceH4/ultrachat_200k:default", True),
                                       ("data/train.jsonl", False), ("data/train.parquet", False),
                                       ("name", False), ("/abs/path", False), ("a/b/c", False), ("./a/b", False)])
def test_what_counts_as_a_hub_id(text, hub):
    assert is_hub_id(text) == hub


def test_a_missing_path_inside_an_existing_folder_is_not_a_hub_id(tmp_path, monkeypatch):
    (tmp_path / "data").mkdir()
    monkeypatch.chdir(tmp_path)
    assert not is_hub_id("data/train") and is_hub_id("elsewhere/train")
    assert "dataset path does not exist" in load_error("data/train")


def test_an_offline_hub_id_names_the_command_that_fetches_it(tmp_path):
    """In a fresh process with offline mode on and an empty cache: no request leaves the machine."""
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"),
           "PYTHONPATH": str(REPO)}
    code = ("from nemo_customizer.data import DatasetError, load_dataset\n"
            "try:\n    load_dataset('nemo-customizer-tests/qa:v2')\n"
            "except DatasetError as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.stdout.strip() == (
        "nemo-customizer-tests/qa:v2: Hugging Face offline mode is on (HF_DATASETS_OFFLINE or HF_HUB_OFFLINE) and the "
        "dataset is not in the datasets cache. Fetch it where huggingface.co is reachable: python -c \"import datasets; "
        "datasets.load_dataset('nemo-customizer-tests/qa', 'v2').save_to_disk('nemo-customizer-tests--qa--v2')\", "
        "then pass dataset.path=nemo-customizer-tests--qa--v2 (copy the folder to this machine first if that was "
        "another one)."), out.stderr


def test_a_hub_id_resolves_past_the_store(tmp_path):
    from nemo_customizer.data.store import resolve_dataset_path

    assert resolve_dataset_path("org/name:cfg", tmp_path / "store") == "org/name:cfg"
    with pytest.raises(DatasetError, match="a Hub dataset ID"):
        resolve_dataset_path("no-such-name", tmp_path / "store")


def test_a_missing_field_beside_other_keys_suggests_dataset_columns(tmp_path):
    from nemo_customizer.data import DatasetError, load_dataset

    path = tmp_path / "qa.jsonl"
    path.write_text("".join(json.dumps({"question": f"q{i}", "answer": "a"}) + "\n" for i in range(4)))
    with pytest.raises(DatasetError) as error:
        load_dataset(path)
    message = str(error.value)
    assert 'qa.jsonl:1: field "prompt" is missing' in message and "dataset.columns.prompt=question" in message
