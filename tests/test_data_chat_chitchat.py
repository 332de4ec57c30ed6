"""scripts/prepare_chitchat.py: real conversations from the chitchat-dataset package load and tokenize as chat data."""

from __future__ import annotations

import importlib.util
import json

import pytest

from _scripts import load_script

pytestmark = pytest.mark.skipif(importlib.util.find_spec("chitchat_dataset") is None,
                                reason="pip install --no-deps chitchat-dataset")


def _load_script():
    return load_script("prepare_chitchat")


def test_to_row_alternates_roles_and_ends_on_the_assistant():
    turns = [[{"text": "Hello "}, {"text": "How are you?"}], [{"text": "fine"}], [{"text": "cool"}]]
    assert _load_script().to_row(turns, max_turns=8) == {"messages": [
        {"role": "user", "content": "Hello\nHow are you?"}, {"role": "assistant", "content": "fine"}]}
    assert _load_script().to_row(turns[:1], max_turns=8) is None


def test_prepared_conversations_load_and_tokenize_with_smollm2(tmp_path):
    from transformers import AutoTokenizer

    from nemo_customizer.checkpoints.embedded import resolve_embedded_checkpoint
    from nemo_customizer.data import load_dataset, tokenize_examples

    counts = _load_script().main(["--output-dir", str(tmp_path), "--train", "300", "--validation", "30"])
    assert counts == {"training": 300, "validation": 30}
    train = [json.loads(line) for line in (tmp_path / "training.jsonl").read_text().splitlines()]
    val = [json.loads(line) for line in (tmp_path / "validation.jsonl").read_text().splitlines()]
    assert not {json.dumps(r) for r in train} & {json.dumps(r) for r in val}

    splits = load_dataset(tmp_path)
    assert splits.format == "chat" and (len(splits.train), len(splits.val)) == (300, 30)
    tok = AutoTokenizer.from_pretrained(str(resolve_embedded_checkpoint("smollm2-135m-instruct", None)))
    examples, stats = tokenize_examples(splits.train, tok, 2048)
    assert stats.kept == 300 and stats.dropped == 0
    for conversation, example in zip(splits.train, examples):
        answers = [m["content"] for m in conversation.messages if m["role"] == "assistant"]
        trained = tok.decode([t for t, m in zip(example.input_ids, example.loss_mask) if m])
        assert trained == "".join(a + "<|im_end|>" for a in answers)
