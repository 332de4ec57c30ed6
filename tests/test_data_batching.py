"""Per-epoch shuffle, global -> data-parallel -> micro batch math, and validation batches that use every example."""

import pytest

from nemo_customizer.data import (
    PADDING_EXAMPLE,
    TokenizedExample,
    epoch_order,
    iterate_micro_batches,
    iterate_validation_micro_batches,
    num_micro_batches,
    steps_per_epoch,
    validation_steps,
)


def test_step_counts():
    assert steps_per_epoch(10, 4) == 2 and steps_per_epoch(8, 4) == 2 and steps_per_epoch(3, 4) == 0
    assert validation_steps(10, 4) == 3 and validation_steps(8, 4) == 2 and validation_steps(0, 4) == 0


def test_num_micro_batches():
    assert num_micro_batches(16, 2, 2) == 4 and num_micro_batches(16, 16, 1) == 1
    with pytest.raises(ValueError, match="multiple"):
        num_micro_batches(16, 3, 2)
    with pytest.raises(ValueError):
        num_micro_batches(16, 0, 1)


def test_epoch_order_is_a_seeded_permutation_that_changes_per_epoch():
    order = epoch_order(50, seed=3, epoch=0)
    assert sorted(order) == list(range(50))
    assert order == epoch_order(50, seed=3, epoch=0)
    assert order != epoch_order(50, seed=3, epoch=1) and order != epoch_order(50, seed=4, epoch=0)
    assert epoch_order(50, seed=1, epoch=1) != epoch_order(50, seed=2, epoch=0)


def all_ranks(n, g, mbs, dp, seed=0, epoch=0, **kw):
    """Per rank: the list of steps, each a list of micro batches of example ids."""
    return [list(iterate_micro_batches(list(range(n)), global_batch_size=g, micro_batch_size=mbs, dp_rank=r,
                                       dp_size=dp, seed=seed, epoch=epoch, **kw)) for r in range(dp)]


@pytest.mark.parametrize("dp, mbs", [(1, 1), (1, 4), (2, 1), (2, 2), (4, 1)])
def test_ranks_split_each_global_batch_disjointly_and_completely(dp, mbs):
    n, g = 21, 8
    ranks = all_ranks(n, g, mbs, dp, seed=5, epoch=2)
    order = epoch_order(n, seed=5, epoch=2)
    for rank_steps in ranks:
        assert len(rank_steps) == steps_per_epoch(n, g) == 2
        for micro_batches in rank_steps:
            assert len(micro_batches) == num_micro_batches(g, mbs, dp)
            assert all(len(mb) == mbs for mb in micro_batches)
    for step in range(2):
        # Rank 0's share, then rank 1's, ... is exactly global batch `step` of the epoch order: disjoint and covering.
        joined = [i for rank_steps in ranks for mb in rank_steps[step] for i in mb]
        assert joined == order[step * g:(step + 1) * g]
    used = {i for rank_steps in ranks for step in rank_steps for mb in step for i in mb}
    assert used == set(order[:16])  # the last 5 examples (an incomplete global batch) are dropped


def test_micro_batches_are_contiguous_within_a_rank():
    (steps,) = all_ranks(8, 8, 2, 1, seed=0)
    order = epoch_order(8, seed=0, epoch=0)
    assert steps[0] == [order[0:2], order[2:4], order[4:6], order[6:8]]


def test_epochs_differ_and_start_step_skips():
    assert all_ranks(16, 4, 1, 1, epoch=0) != all_ranks(16, 4, 1, 1, epoch=1)
    full = all_ranks(16, 4, 2, 2)
    resumed = all_ranks(16, 4, 2, 2, start_step=3)
    assert [steps[3:] for steps in full] == resumed


def test_too_few_examples_give_no_training_steps():
    assert all_ranks(3, 4, 1, 1) == [[]]


def test_bad_rank():
    with pytest.raises(ValueError, match="dp_rank"):
        next(iterate_micro_batches([1, 2], global_batch_size=2, micro_batch_size=1, dp_rank=2, dp_size=2, seed=0,
                                   epoch=0))


@pytest.mark.parametrize("n, g, mbs, dp", [(9, 4, 1, 2), (10, 4, 1, 2), (7, 8, 2, 2), (1, 4, 1, 4), (12, 6, 3, 2)])
def test_validation_uses_every_example_once_with_equal_micro_batches_per_rank(n, g, mbs, dp):
    examples = [TokenizedExample([i, i], [1, 1]) for i in range(n)]
    ranks = [list(iterate_validation_micro_batches(examples, global_batch_size=g, micro_batch_size=mbs,
                                                   dp_rank=r, dp_size=dp)) for r in range(dp)]
    assert all(len(steps) == validation_steps(n, g) for steps in ranks)
    seen = []
    for step in range(validation_steps(n, g)):
        counts = {len(steps[step]) for steps in ranks}
        assert len(counts) == 1  # every rank runs the same number of micro batches
        assert all(len(mb) == mbs for steps in ranks for mb in steps[step])
        seen += [e for steps in ranks for mb in steps[step] for e in mb]
    real = [e for e in seen if e is not PADDING_EXAMPLE]
    assert real == examples  # all of them, once, in order
    assert len(seen) - len(real) < mbs * dp  # padding only fills the last round
