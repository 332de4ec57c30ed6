"""Batches of preference pairs: both sequences of a pair side by side (chosen first), padded or packed, with the
sequence each position belongs to; packing plans count pairs."""

from __future__ import annotations

import random

import pytest
import torch

from nemo_customizer.data import (PADDING_PAIR, TokenizedExample, TokenizedPair, collate, collate_packed_pairs,
                                  collate_pairs, iterate_validation_micro_batches, plan_pair_packing)


def _pair(prompt: int, chosen: int, rejected: int, start: int = 10) -> TokenizedPair:
    """A pair whose prompt has ``prompt`` tokens and whose responses have ``chosen``/``rejected`` tokens."""
    head = list(range(start, start + prompt))

    def sequence(n: int, offset: int) -> TokenizedExample:
        return TokenizedExample(head + [offset + i for i in range(n)], [0] * prompt + [1] * n)

    return TokenizedPair(sequence(chosen, 100), sequence(rejected, 200))


def test_collate_pairs_puts_each_pairs_chosen_before_its_rejected():
    pairs = [_pair(3, 2, 4), _pair(2, 1, 1)]
    batch = collate_pairs(pairs, pad_id=0)
    rows = [pairs[0].chosen, pairs[0].rejected, pairs[1].chosen, pairs[1].rejected]
    plain = collate(rows, pad_id=0)
    for key in ("tokens", "labels", "loss_mask", "position_ids", "num_real_tokens"):
        assert torch.equal(batch[key], plain[key]), key
    assert batch["sequence_index"].tolist() == [[0] * 4 + [-1] * 2, [1] * 6, [2] * 2 + [-1] * 4, [3] * 2 + [-1] * 4]
    assert batch["sequence_tokens"].tolist() == [2.0, 4.0, 1.0, 1.0]


def test_a_padding_pair_is_two_fully_masked_rows():
    batch = collate_pairs([_pair(2, 2, 2), PADDING_PAIR], pad_id=0, pad_to_multiple_of=4)
    assert batch["tokens"].shape == (4, 4)
    assert batch["loss_mask"][2:].sum() == 0 and (batch["sequence_index"][2:] == -1).all()
    assert batch["sequence_tokens"].tolist() == [2.0, 2.0, 0.0, 0.0]


def test_collate_packed_pairs_gives_each_sequence_its_own_segment():
    bins = [(_pair(3, 2, 4), _pair(2, 1, 1)), (_pair(1, 3, 2),)]
    batch = collate_packed_pairs(bins, pad_id=0, pad_to_multiple_of=8)
    sequences = [s for b in bins for p in b for s in (p.chosen, p.rejected)]
    lengths = [len(s.input_ids) - 1 for s in sequences]
    assert batch["cu_seqlens"].tolist()[:len(lengths) + 1] == [sum(lengths[:i]) for i in range(len(lengths) + 1)]
    assert batch["tokens"].shape[1] % 8 == 0 and batch["tokens"].shape[1] - sum(lengths) < 8
    expected_index = [i for i, n in enumerate(lengths) for _ in range(n)]
    index = batch["sequence_index"][0].tolist()
    assert index[:sum(lengths)] == expected_index and set(index[sum(lengths):]) <= {-1}
    expected_positions = [p for n in lengths for p in range(n)]
    assert batch["position_ids"][0, :sum(lengths)].tolist() == expected_positions
    for number, sequence in enumerate(sequences):  # inputs, labels and masks of each segment are its own, shifted
        at = batch["sequence_index"][0] == number
        assert batch["tokens"][0, at].tolist() == sequence.input_ids[:-1]
        assert batch["labels"][0, at].tolist() == sequence.input_ids[1:]
        assert batch["loss_mask"][0, at].tolist() == sequence.loss_mask[1:]
    assert batch["sequence_tokens"].tolist() == [2.0, 4.0, 1.0, 1.0, 3.0, 2.0]
    with pytest.raises(ValueError, match="nothing to predict"):
        collate_packed_pairs([(PADDING_PAIR,)], pad_id=0)


def test_validation_batches_of_pairs_are_padded_with_padding_pairs():
    pairs = [_pair(2, 1, 1) for _ in range(5)]
    steps = list(iterate_validation_micro_batches(pairs, global_batch_size=4, micro_batch_size=2, dp_rank=1, dp_size=2,
                                                  padding=PADDING_PAIR))
    assert steps == [[[pairs[2], pairs[3]]], [[PADDING_PAIR, PADDING_PAIR]]]


def test_pair_packing_keeps_pairs_whole_and_counts_pairs():
    rng = random.Random(0)
    pairs = [_pair(rng.randint(2, 30), rng.randint(1, 20), rng.randint(1, 20)) for _ in range(64)]
    plan = plan_pair_packing(pairs, max_seq_length=64, batch_size=8, micro_batch_size=2, dp_size=1, seed=0)
    assert sorted(i for b in plan.bins for i in b) == list(range(64))  # every pair in one bin, whole
    assert all(sum(pairs[i].length for i in b) <= plan.bin_capacity <= 128 for b in plan.bins)
    assert plan.unit == "pairs" and plan.max_bin_tokens == 128
    assert plan.packing_factor > 1
    # the tokens per step stay those of 8 pairs unpacked, as packing examples keeps those of batch_size examples
    assert plan.tokens_per_step == pytest.approx(plan.requested_tokens_per_step, rel=0.25)
    assert plan.padding_after < plan.padding_before
    assert "64 pairs in" in plan.describe() and "batch_size 8 pairs ->" in plan.describe()
    taken = plan.take(pairs)
    assert all(isinstance(b, tuple) and all(isinstance(p, TokenizedPair) for p in b) for b in taken)
