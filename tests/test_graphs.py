"""CUDA graphs for packed micro batches (training/graphs.py): the static shapes and their padding, the config checks
and the RNG states a capture needs. The numerics of the graphed path (padding and schedule) against mcore's schedule
are in test_packing_numerics.py; the capture itself needs a GPU (tests/gpu/test_training_gpu.py)."""

import pytest
import torch

from nemo_customizer.config import ConfigError, compose_config
from nemo_customizer.config.validate import validate_config
from nemo_customizer.data import TokenizedExample, collate_packed
from nemo_customizer.training.graphs import StaticShape, pad_to_static, static_shape, token_multiple


def _row(lengths, prompt=2, pad_to_multiple_of=1):
    examples = [TokenizedExample(list(range(1, n + 2)), [0] * prompt + [1] * (n + 1 - prompt)) for n in lengths]
    return collate_packed([examples], pad_id=0, pad_to_multiple_of=pad_to_multiple_of)


def test_token_multiple_stays_within_max_seqlen_and_divides_by_tp():
    assert token_multiple(4096) == 512
    assert token_multiple(4096, 2) == 512
    assert token_multiple(48) == 48
    assert token_multiple(48, 3) == 48 and token_multiple(50, 4) == 48
    assert token_multiple(2, 4) == 4  # never below the TP size


def test_static_shape_rounds_up_tokens_segments_and_loss_positions():
    row = _row([100, 200, 50])  # 350 positions, 3 segments, 347 loss positions
    shape = static_shape(row, token_multiple(4096))
    assert shape == StaticShape(tokens=512, segments=16, loss_positions=384)
    many = _row([3] * 40)  # 40 segments + padding segment -> 64
    assert static_shape(many, 512).segments == 64
    full = _row([511])  # no padding needed: no extra segment
    assert static_shape(full, 512) == StaticShape(512, 16, 512)


def test_padding_changes_nothing_the_loss_sees():
    row = _row([5, 7, 3])  # 15 positions
    shape = StaticShape(tokens=24, segments=8, loss_positions=16)
    padded = pad_to_static(row, shape, pad_id=9)
    assert padded.tokens.shape == padded.labels.shape == padded.position_ids.shape == (1, 24)
    assert torch.equal(padded.tokens[0, :15], row["tokens"][0]) and (padded.tokens[0, 15:] == 9).all()
    assert torch.equal(padded.labels[0, :15], row["labels"][0])
    assert padded.position_ids[0, 15:].tolist() == list(range(9))  # the padding restarts its positions
    # the real boundaries, the padding's own segment, then empty segments up to the capacity
    assert padded.cu_seqlens.tolist() == [0, 5, 12, 15, 24, 24, 24, 24, 24]
    expected = (row["loss_mask"][0] > 0).nonzero().squeeze(1)
    assert padded.loss_tokens == len(expected) == 12  # n - 1 per example: the first label is a prompt token
    assert torch.equal(padded.loss_index[:12], expected) and (padded.loss_index[12:] == 0).all()
    assert padded.loss_weight.tolist() == [1.0] * 12 + [0.0] * 4


def test_a_batch_larger_than_the_shape_is_refused():
    row = _row([30])
    for shape, what in ((StaticShape(16, 16, 32), "tokens"), (StaticShape(32, 1, 32), "segments"),
                        (StaticShape(32, 16, 8), "loss positions")):
        with pytest.raises(ValueError, match=what):
            pad_to_static(row, shape)


BASE = ["model=tiny-llama-test", "dataset.path=data.jsonl", "hyperparameters.cuda_graphs=true"]


@pytest.mark.parametrize("overrides, pattern", [
    ([], r"replays packed micro batches \(fixed shapes\); set hyperparameters.sequence_packing_enabled=true"),
    (["hyperparameters.sequence_packing_enabled=true", "model.pipeline_parallel_size=2"],
     "cuda_graphs=true runs with model.pipeline_parallel_size=1 only"),
    (["hyperparameters.sequence_packing_enabled=true", "hyperparameters.activation_checkpointing=true"],
     "cuda_graphs=true and activation_checkpointing=true cannot be combined"),
])
def test_unsupported_layouts_are_config_errors(overrides, pattern):
    with pytest.raises(ConfigError, match=pattern):
        validate_config(compose_config([*BASE, *overrides]))


def test_tensor_and_sequence_parallelism_are_allowed_with_graphs():
    validate_config(compose_config([*BASE, "hyperparameters.sequence_packing_enabled=true",
                                    "model.tensor_parallel_size=2", "model.use_sequence_parallel=true"]))


def test_graph_safe_rng_states_are_saved_as_tensors_and_registered(monkeypatch):
    """A graph-safe tracker (what graphs switch to) holds generator objects: a checkpoint must save their states as
    tensors, and each capture must register the generators themselves."""
    from megatron.core.tensor_parallel import random as mcore_random

    from nemo_customizer.distributed.parallel import rng_states_to_register, rng_tracker_states

    generator = torch.Generator().manual_seed(7)
    tracker = mcore_random.CudaRNGStatesTracker()
    tracker.use_cudagraphable_rng = True  # the constructor's flag asserts CUDA graph support, absent on CPU builds
    tracker.set_states({"model-parallel-rng": generator})
    monkeypatch.setattr(mcore_random, "get_cuda_rng_tracker", lambda: tracker)
    saved = rng_tracker_states()
    assert isinstance(saved["model-parallel-rng"], torch.Tensor)
    assert torch.equal(saved["model-parallel-rng"], torch.Generator().manual_seed(7).get_state())
    assert rng_states_to_register() == [generator]


def test_cuda_graphs_on_cpu_fail_before_any_work(tmp_path):
    from nemo_customizer.api import customize

    with pytest.raises(ConfigError, match="cuda_graphs=true needs a CUDA device"):
        customize("tiny-llama-test", dataset=str(tmp_path / "missing"), output_dir=str(tmp_path / "job"),
                  device="cpu", hyperparameters={"sequence_packing_enabled": True, "cuda_graphs": True})
    assert not (tmp_path / "job").exists()
