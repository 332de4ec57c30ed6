"""Sequence packing, pure parts: bin packing, the packed collate's boundaries, and the batch-size rule."""

import random

import pytest
import torch

from nemo_customizer.data import TokenizedExample, collate, collate_packed, pack_examples, pack_lengths, plan_packing
from nemo_customizer.data.packing import packed_batch_sizes, padding_fraction

PAD = 0


def _random_lengths(n: int, seed: int, low: int = 1, high: int = 100) -> list:
    rng = random.Random(seed)
    return [rng.randint(low, high) for _ in range(n)]


@pytest.mark.parametrize("seed", range(5))
def test_bins_respect_capacity_and_hold_every_item_once(seed):
    lengths = _random_lengths(500, seed)
    bins = pack_lengths(lengths, 128)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= 128 for b in bins)
    # Close to the lower bound ceil(total / capacity): decreasing-order heuristics waste little on such data.
    lower = -(-sum(lengths) // 128)
    assert len(bins) <= lower * 1.05 + 1


def test_packing_is_deterministic_and_order_independent_of_the_caller():
    lengths = _random_lengths(300, 7)
    assert pack_lengths(lengths, 100) == pack_lengths(list(lengths), 100)
    # the same multiset in another order packs into bins of the same sizes
    perm = random.Random(1).sample(range(len(lengths)), len(lengths))
    sizes = sorted(sum(lengths[i] for i in b) for b in pack_lengths(lengths, 100))
    permuted = [lengths[i] for i in perm]
    assert sizes == sorted(sum(permuted[i] for i in b) for b in pack_lengths(permuted, 100))


def test_best_fit_decreasing_on_a_hand_checked_case():
    # Longest first: 6 -> new bin 0 (room 4); 5 -> new bin 1 (room 5); 4 -> bin 0 (room 4 is the tightest fit);
    # 4 -> bin 1 (room 1); 3 -> new bin 2 (room 7); 2 -> bin 2 (room 5); 1 -> bin 1 (room 1, tighter than 5).
    lengths = [4, 6, 2, 5, 4, 3, 1]
    bins = pack_lengths(lengths, 10)
    assert [[lengths[i] for i in b] for b in bins] == [[6, 4], [5, 4, 1], [3, 2]]
    assert pack_lengths([10, 10], 10) == [[0], [1]]
    assert pack_lengths([], 10) == []


def test_an_item_longer_than_the_capacity_is_an_error():
    with pytest.raises(ValueError, match="longer than the bin capacity 8.*index 1 with length 9"):
        pack_lengths([3, 9], 8)


def _example(ids, first_target):
    return TokenizedExample(list(ids), [0] * first_target + [1] * (len(ids) - first_target))


def test_packed_collate_shifts_per_example_and_restarts_positions():
    a = _example([1, 10, 11, 12, 2], 3)  # 4 positions
    b = _example([1, 20, 21, 2], 2)  # 3 positions
    c = _example([1, 30, 2], 1)  # 2 positions
    batch = collate_packed([(a, b), (c,)], pad_id=PAD)
    assert batch["tokens"].tolist() == [[1, 10, 11, 12, 1, 20, 21, 1, 30]]
    assert batch["labels"].tolist() == [[10, 11, 12, 2, 20, 21, 2, 30, 2]]
    assert batch["loss_mask"].tolist() == [[0, 0, 1, 1, 0, 1, 1, 1, 1]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 0, 1, 2, 0, 1]]
    assert batch["cu_seqlens"].tolist() == [0, 4, 7, 9] and batch["cu_seqlens"].dtype == torch.int32
    assert batch["max_seqlen"].item() == 4
    assert batch["num_real_tokens"].item() == 9


def test_no_label_crosses_an_example_boundary():
    rng = random.Random(3)
    examples = [_example([1] + [rng.randint(3, 300) for _ in range(rng.randint(1, 30))] + [2], 1) for _ in range(40)]
    batch = collate_packed(pack_examples(examples, 64)[:5], pad_id=PAD, pad_to_multiple_of=4)
    tokens, labels, positions = batch["tokens"][0], batch["labels"][0], batch["position_ids"][0]
    cu = batch["cu_seqlens"].tolist()
    for start, end in zip(cu[:-1], cu[1:]):
        assert positions[start:end].tolist() == list(range(end - start))
    # Each segment's labels are its own tokens shifted by one; the segment's last label is its example's last
    # token (never the next example's first), matching unpacked collate row by row.
    for start, end in zip(cu[:-2], cu[1:-1]):
        assert labels[start:end - 1].tolist() == tokens[start + 1:end].tolist()
        assert labels[end - 1].item() == 2  # the example's own EOS
    assert tokens.numel() % 4 == 0


def test_packed_rows_hold_the_same_per_example_tensors_as_padded_rows():
    rng = random.Random(5)
    examples = [_example([1] + [rng.randint(3, 300) for _ in range(rng.randint(1, 20))], rng.randint(1, 3))
                for _ in range(9)]
    padded, packed = collate(examples, pad_id=PAD), collate_packed([examples], pad_id=PAD)
    cu = packed["cu_seqlens"].tolist()
    for row, (start, end) in enumerate(zip(cu[:-1], cu[1:])):
        for key in ("tokens", "labels", "loss_mask", "position_ids"):
            assert torch.equal(packed[key][0, start:end], padded[key][row, :end - start]), key
    assert packed["num_real_tokens"] == padded["num_real_tokens"]
    assert packed["loss_mask"].sum() == padded["loss_mask"].sum()


def test_trailing_padding_is_its_own_masked_segment():
    batch = collate_packed([[_example([1, 5, 6, 2], 1)]], pad_id=PAD, pad_to_multiple_of=4)  # 3 real + 1 pad
    assert batch["tokens"].tolist() == [[1, 5, 6, PAD]]
    assert batch["loss_mask"].tolist() == [[1, 1, 1, 0]]
    assert batch["cu_seqlens"].tolist() == [0, 3, 4]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0]]
    assert batch["num_real_tokens"].item() == 3
    exact = collate_packed([[_example([1, 5, 6, 7, 2], 1)]], pad_id=PAD, pad_to_multiple_of=2)
    assert exact["cu_seqlens"].tolist() == [0, 4]


@pytest.mark.parametrize("batch, micro, dp, factor, expected", [
    (16, 1, 1, 1.0, (16, 1)),     # nothing packs together: unchanged
    (16, 1, 1, 4.0, (4, 1)),      # 4 examples per bin: a quarter of the bins per step
    (16, 16, 1, 4.0, (4, 4)),     # the micro batch shrinks by the factor too (same tokens per forward)
    (16, 16, 1, 20.0, (1, 1)),    # never below one bin
    (16, 2, 1, 3.0, (5, 1)),      # round(16 / 3) = 5
    (16, 1, 2, 3.0, (6, 1)),      # 5 bins rounded to a multiple of dp: 6
    (16, 1, 4, 20.0, (4, 1)),     # at least one micro batch per data-parallel rank
    (32, 4, 2, 2.5, (14, 1)),     # target 13 -> 7 per rank; micro <= round(1.6) = 2 must divide 7: 1
    (24, 8, 1, 2.0, (12, 4)),     # micro 4 divides 12
    (16, 8, 1, 3.0, (5, 1)),      # 5 bins keep the tokens per step; micro round(8 / 3) = 3 does not divide 5: 1
    (10, 1, 1, 4.0, (3, 1)),      # round half up: 2.5 -> 3
])
def test_packed_batch_sizes(batch, micro, dp, factor, expected):
    global_bins, micro_bins = packed_batch_sizes(batch, micro, dp, factor)
    assert (global_bins, micro_bins) == expected
    assert global_bins % (micro_bins * dp) == 0
    assert micro_bins <= micro  # a packed micro batch never has more rows than an unpacked one


def test_plan_keeps_tokens_per_step_and_states_padding():
    rng = random.Random(11)
    examples = [_example([1] + [5] * rng.choice([4, 5, 6, 60, 120]), 1) for _ in range(400)]
    plan = plan_packing(examples, max_seq_length=128, batch_size=16, micro_batch_size=4, dp_size=1, seed=0)
    assert sorted(i for b in plan.bins for i in b) == list(range(400))
    assert plan.packing_factor == pytest.approx(400 / len(plan.bins))
    assert plan.global_batch_size == max(1, round(16 / plan.packing_factor))
    assert plan.steps_per_epoch == len(plan.bins) // plan.global_batch_size
    tokens_per_example = sum(len(e.input_ids) for e in examples) / 400
    tokens_per_bin = sum(len(e.input_ids) for e in examples) / len(plan.bins)
    # each step sees the tokens of 16 examples on average, up to rounding the bin count (half a bin of 16 / factor)
    assert plan.global_batch_size * tokens_per_bin == pytest.approx(16 * tokens_per_example,
                                                                    rel=plan.packing_factor / 32)
    assert plan.padding_before > 0.3 and plan.padding_after == 0.0
    text = plan.describe()
    assert f"packing factor {plan.packing_factor:.2f}" in text and "padding" in text
    assert [plan.take(examples)[0][k] for k in range(len(plan.bins[0]))] == [examples[i] for i in plan.bins[0]]


def test_padding_fraction():
    # micro batches of 2 in epoch-0 order; lengths are positions after the shift
    assert padding_fraction([4, 4, 4, 4], batch_size=4, micro_batch_size=2, seed=0) == 0.0
    assert padding_fraction([1, 3], batch_size=2, micro_batch_size=2, seed=0) == pytest.approx(1 - 4 / 6)
    assert padding_fraction([1, 3], batch_size=2, micro_batch_size=1, seed=0, packed=True) == 0.0
    assert padding_fraction([3, 3], batch_size=2, micro_batch_size=2, seed=0, packed=True,
                            pad_to_multiple_of=4) == pytest.approx(2 / 8)


def _examples(lengths):
    return [_example([1] * n, n - 1) for n in lengths]


@pytest.mark.parametrize("low, high, max_seq_length, batch_size, micro, dp", [
    (40, 120, 2048, 16, 1, 1),    # short rows, ~27 per full bin: one bin would be 1.7 steps' worth
    (40, 120, 2048, 16, 16, 1),
    (40, 120, 2048, 16, 1, 2),    # one smaller bin per data-parallel rank
    (40, 120, 2048, 16, 4, 2),
    (5, 30, 8192, 64, 8, 4),
    (10, 40, 4096, 8, 1, 2),
    (300, 1500, 2048, 16, 1, 1),  # long rows: full bins of ~2 examples, already close
    (300, 1500, 2048, 16, 2, 2),
    (100, 3000, 4096, 32, 4, 1),  # mixed
])
def test_packing_keeps_tokens_per_step_and_steps_per_epoch(low, high, max_seq_length, batch_size, micro, dp):
    rng = random.Random(low + high + dp)
    lengths = [rng.randint(low, high) for _ in range(1500)]
    plan = plan_packing(_examples(lengths), max_seq_length=max_seq_length, batch_size=batch_size,
                        micro_batch_size=micro, dp_size=dp, seed=0)
    assert sorted(i for b in plan.bins for i in b) == list(range(len(lengths)))
    assert max(lengths) <= plan.bin_capacity <= max_seq_length
    assert all(sum(lengths[i] for i in b) <= plan.bin_capacity for b in plan.bins)
    unpacked_tokens_per_step = batch_size * sum(lengths) / len(lengths)
    assert plan.tokens_per_step == pytest.approx(unpacked_tokens_per_step, rel=0.10)
    assert plan.requested_tokens_per_step == pytest.approx(unpacked_tokens_per_step)
    assert plan.steps_per_epoch == pytest.approx(len(lengths) // batch_size, rel=0.10)
    assert plan.requested_steps_per_epoch == len(lengths) // batch_size
    # peak activation memory: a packed micro batch is never more than an unpacked one can be
    assert plan.micro_batch_size <= micro
    assert plan.micro_batch_size * plan.bin_capacity <= micro * max_seq_length
    assert plan.global_batch_size % (plan.micro_batch_size * dp) == 0


def test_short_examples_get_bins_of_a_step_and_the_log_states_requested_and_actual():
    # 720 rows of ~75 tokens, batch 16, 2048-token context: full bins would hold ~27 rows, so one bin per step would
    # carry 1.7x a step's tokens in 40% fewer steps. The bins shrink to a step's 16 rows instead.
    rng = random.Random(0)
    lengths = [rng.randint(45, 105) for _ in range(720)]
    plan = plan_packing(_examples(lengths), max_seq_length=2048, batch_size=16, micro_batch_size=1, dp_size=1,
                        seed=0)
    assert plan.bin_capacity < 2048 and plan.global_batch_size == 1
    assert plan.steps_per_epoch == 45 and plan.packing_factor == pytest.approx(16, rel=0.02)
    text = plan.describe()
    assert f"steps per epoch 45 (unpacked: 45)" in text
    assert f"tokens per step {plan.tokens_per_step:,.0f} (unpacked: {plan.requested_tokens_per_step:,.0f})" in text
    assert f"smaller than max_seq_length 2048" in text
    two_ranks = plan_packing(_examples(lengths), max_seq_length=2048, batch_size=16, micro_batch_size=1, dp_size=2,
                             seed=0)
    assert two_ranks.global_batch_size == 2 and two_ranks.packing_factor == pytest.approx(8, rel=0.02)
    assert two_ranks.steps_per_epoch == 45


def test_full_length_bins_stay_when_they_already_keep_the_step():
    rng = random.Random(1)
    lengths = [rng.randint(300, 1500) for _ in range(600)]
    plan = plan_packing(_examples(lengths), max_seq_length=2048, batch_size=16, micro_batch_size=1, dp_size=1,
                        seed=0)
    assert plan.bin_capacity == 2048 and plan.bins == pack_lengths(lengths, 2048)
    assert "smaller than max_seq_length" not in plan.describe()
