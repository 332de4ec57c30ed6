"""Collate: right padding, the next-token shift, loss mask on completions only, and a real-token count."""

import json

import pytest
import torch

from nemo_customizer.data import (
    PADDING_EXAMPLE,
    TokenizedExample,
    collate,
    iterate_micro_batches,
    load_dataset,
    tokenize_examples,
)

PAD = 0


def test_shapes_shift_and_padding():
    a = TokenizedExample([1, 4, 5, 2], [0, 0, 1, 1])
    b = TokenizedExample([1, 6, 7, 8, 9, 2], [0, 0, 0, 1, 1, 1])
    batch = collate([a, b], pad_id=PAD)
    assert batch["tokens"].tolist() == [[1, 4, 5, PAD, PAD], [1, 6, 7, 8, 9]]
    assert batch["labels"].tolist() == [[4, 5, 2, PAD, PAD], [6, 7, 8, 9, 2]]
    assert batch["loss_mask"].tolist() == [[0, 1, 1, 0, 0], [0, 0, 1, 1, 1]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4]] * 2
    assert batch["num_real_tokens"].item() == 3 + 5
    assert batch["tokens"].dtype == batch["labels"].dtype == batch["position_ids"].dtype == torch.long
    assert batch["loss_mask"].dtype == torch.float32


@pytest.mark.parametrize("multiple, expected_len", [(1, 5), (2, 6), (4, 8), (5, 5), (16, 16)])
def test_pad_to_multiple_of(multiple, expected_len):
    batch = collate([TokenizedExample([1, 2, 3, 4, 5, 6], [0, 0, 0, 1, 1, 1])], pad_id=PAD,
                    pad_to_multiple_of=multiple)
    assert batch["tokens"].shape == batch["labels"].shape == batch["loss_mask"].shape == (1, expected_len)
    assert batch["loss_mask"][0, 5:].sum() == 0 and batch["labels"][0, 5:].eq(PAD).all()
    assert batch["num_real_tokens"].item() == 5


def test_padding_rows_are_fully_masked():
    batch = collate([PADDING_EXAMPLE, PADDING_EXAMPLE], pad_id=7, pad_to_multiple_of=2)
    assert batch["tokens"].shape == (2, 2) and batch["tokens"].eq(7).all()
    assert batch["loss_mask"].sum() == 0 and batch["num_real_tokens"].item() == 0
    mixed = collate([TokenizedExample([1, 2, 3], [0, 1, 1]), PADDING_EXAMPLE], pad_id=PAD)
    assert mixed["loss_mask"].tolist() == [[1, 1], [0, 0]]


def test_bad_multiple():
    with pytest.raises(ValueError):
        collate([PADDING_EXAMPLE], pad_id=PAD, pad_to_multiple_of=0)


def test_end_to_end_loss_covers_exactly_the_completion_tokens(tmp_path):
    from test_data_tokenization import tiny_tokenizer

    f = tmp_path / "train.jsonl"
    f.write_text("".join(json.dumps({"prompt": "a b c", "completion": " ".join("defg"[: i % 4 + 1])}) + "\n"
                         for i in range(8)))
    splits = load_dataset(f, val_fraction=0.0)
    examples, stats = tokenize_examples(splits.train, tiny_tokenizer(), max_seq_length=64)
    assert stats.kept == 8
    masked = 0
    for micro_batches in iterate_micro_batches(examples, global_batch_size=4, micro_batch_size=2, dp_rank=0,
                                               dp_size=1, seed=0, epoch=0):
        for mb in micro_batches:
            batch = collate(mb, pad_id=PAD, pad_to_multiple_of=4)
            assert batch["tokens"].shape[1] % 4 == 0
            # Every target under the mask is a completion word (d..g = 7..10) or EOS (2).
            assert set(batch["labels"][batch["loss_mask"].bool()].tolist()) <= {7, 8, 9, 10, 2}
            masked += int(batch["loss_mask"].sum())
    assert masked == sum(i % 4 + 1 + 1 for i in range(8))  # completion words + EOS of every row
