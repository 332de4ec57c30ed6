"""mcore's RNG tracker switched to graph-safe generators (what CUDA graphs need under sequence parallelism)."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.gpu


@pytest.fixture
def default_tracker():
    """A CUDA parallel state whose RNG tracker is mcore's default one, whatever an earlier job switched it to; the
    default tracker again afterwards, for the tests after this one."""
    from megatron.core.tensor_parallel import random as mcore_random

    from nemo_customizer.distributed.parallel import destroy_parallel, initialize_parallel

    mcore_random.initialize_rng_tracker(force_reset=True)
    layout = initialize_parallel(tensor_parallel_size=1, pipeline_parallel_size=1, device=torch.device("cuda"),
                                 seed=3)
    try:
        yield
    finally:
        destroy_parallel(layout)
        mcore_random.initialize_rng_tracker(force_reset=True)


def _draw() -> torch.Tensor:
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    with get_cuda_rng_tracker().fork():
        return torch.rand(8, device="cuda")


def test_graph_safe_rng_keeps_states_restores_them_and_draws_anew_in_a_graph(default_tracker):
    """The switch keeps the tracker's states; a checkpoint's tensor copy of them restores them; a fork captured in a
    CUDA graph draws new numbers on every replay."""
    from nemo_customizer.distributed.parallel import (rng_states_to_register, rng_tracker_states,
                                                      set_rng_tracker_states, use_graph_safe_rng)

    before = rng_tracker_states()
    expected = _draw()
    set_rng_tracker_states(before)
    use_graph_safe_rng()
    assert torch.equal(_draw(), expected), "switching to graph-safe generators changed the states"

    saved = rng_tracker_states()
    first = _draw()
    set_rng_tracker_states(saved)
    assert torch.equal(_draw(), first), "the checkpoint round trip did not restore the states"

    graph, out = torch.cuda.CUDAGraph(), torch.empty(8, device="cuda")
    for generator in rng_states_to_register():
        graph.register_generator_state(generator)
    stream = torch.cuda.Stream()
    with torch.cuda.graph(graph, stream=stream, capture_error_mode="thread_local"):
        out.copy_(_draw())
    graph.replay()
    replay1 = out.clone()
    graph.replay()
    assert not torch.equal(out, replay1), "replays draw the same numbers"
