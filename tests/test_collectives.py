"""The library's own small collectives, over gloo in two processes."""

import json

from _multiproc import run_world


def _reduce(rank: int, out: str) -> None:
    import torch.distributed as dist

    from nemo_customizer.distributed.collectives import all_reduce_max, all_reduce_sum

    dist.init_process_group("gloo")
    try:
        result = {"max": all_reduce_max([float(rank), -float(rank), 2.5]),
                  "sum": all_reduce_sum([float(rank) + 1, 0.5])}
    finally:
        dist.destroy_process_group()
    with open(f"{out}.{rank}.json", "w") as handle:
        json.dump(result, handle)


def test_max_and_sum_over_ranks(tmp_path):
    run_world(_reduce, 2, str(tmp_path / "out"))
    for rank in range(2):
        result = json.loads((tmp_path / f"out.{rank}.json").read_text())
        assert result == {"max": [1.0, 0.0, 2.5], "sum": [3.0, 1.0]}


def test_one_process_needs_no_process_group():
    from nemo_customizer.distributed.collectives import all_reduce_max

    assert all_reduce_max([3.0, -1.0]) == [3.0, -1.0]
