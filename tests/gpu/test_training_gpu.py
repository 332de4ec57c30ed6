"""Fine-tuning the tiny random Llama on CUDA, per-step losses of short jobs: bf16 against CPU fp32, bf16 weights
without fp32 masters against mixed precision, CUDA graphs against eager, FlashAttention-4 against torch's flash
attention."""

from __future__ import annotations

import pytest

from _relative_error import worst_step_rel

pytestmark = pytest.mark.gpu

BF16_RTOL = 3e-2  # per-step loss, bf16 weights/activations against fp32
GRAPHS_RTOL = 5e-3  # per-step loss, the same bf16 job with and without CUDA graphs (padded GEMM shapes round apart)
KINDS = ("lora", "all_weights")
# 3 epochs of 3 steps of 8 micro batches: several static shapes, each replayed many times
PACKED = dict(sequence_packing_enabled=True, batch_size=32, micro_batch_size=2, epochs=3, max_steps=9)
DROPOUT = dict(lora={"adapter_dropout": 0.1}, **PACKED)


@pytest.mark.parametrize("kind", KINDS)
def test_cuda_bf16_losses_match_cpu_fp32(tiny_jobs, kind):
    gpu = tiny_jobs.losses(f"{kind}-cuda", "cuda", "bf16", kind)
    cpu = tiny_jobs.losses(f"{kind}-cpu", "cpu", "fp32", kind)
    assert len(cpu) == len(gpu) == 10
    assert worst_step_rel(cpu, gpu) <= BF16_RTOL, (cpu, gpu)


def test_a_cuda_job_after_a_cpu_job_in_the_same_process_is_unchanged(tiny_jobs):
    """A CPU job's adaptations of megatron-core end with its parallel state: the same CUDA job after it has the same
    losses as before it (and torch's own CUDA functions)."""
    import torch

    before = tiny_jobs.losses("lora-cuda", "cuda", "bf16", "lora")
    tiny_jobs.losses("lora-cpu", "cpu", "fp32", "lora")
    assert isinstance(torch.cuda.current_device(), int)
    after = tiny_jobs.losses("lora-cuda-after-cpu", "cuda", "bf16", "lora")
    assert worst_step_rel(before, after) <= 1e-3, (before, after)


def test_bf16_weights_without_fp32_masters_match_mixed_precision(tiny_jobs):
    """bf16 weights updated in place (no fp32 master copy; stochastic rounding) against mixed precision."""
    mixed = tiny_jobs.losses("all_weights-cuda", "cuda", "bf16", "all_weights")
    bf16_weights = tiny_jobs.losses("all_weights-bf16-weights", "cuda", "bf16", "all_weights",
                                    fp32_master_weights=False)
    assert len(bf16_weights) == 10
    assert worst_step_rel(mixed, bf16_weights) <= BF16_RTOL, (mixed, bf16_weights)


@pytest.mark.parametrize("kind", KINDS)
def test_cuda_graphs_losses_match_eager(tiny_jobs, kind):
    """Packed micro batches eagerly against replayed from CUDA graphs (training.graphs)."""
    eager = tiny_jobs.losses(f"{kind}-packed", "cuda", "bf16", kind, **PACKED)
    graphed = tiny_jobs.losses(f"{kind}-graphs", "cuda", "bf16", kind, cuda_graphs=True, **PACKED)
    assert len(eager) == len(graphed) > 1
    assert worst_step_rel(eager, graphed) <= GRAPHS_RTOL, (eager, graphed)


def test_cuda_graphs_draw_new_dropout_masks_on_every_replay(tiny_jobs):
    """LoRA dropout draws random numbers inside the graph: the replayed job has other masks than the eager one, so
    its losses are only close (within 5%), and differ from the same graphed job without dropout."""
    graphed_without_dropout = tiny_jobs.losses("lora-graphs", "cuda", "bf16", "lora", cuda_graphs=True, **PACKED)
    eager = tiny_jobs.losses("lora-packed-dropout", "cuda", "bf16", "lora", **DROPOUT)
    graphed = tiny_jobs.losses("lora-graphs-dropout", "cuda", "bf16", "lora", cuda_graphs=True, **DROPOUT)
    assert len(eager) == len(graphed) > 1
    assert worst_step_rel(eager, graphed) <= 0.05, (eager, graphed)
    assert graphed != graphed_without_dropout


def test_flash_attn4_losses_match_torch_flash_attention(tiny_jobs, flash_attn4):
    """Where FlashAttention-4 runs, packed jobs take it (``model.attention_kernel=auto``)."""
    fa4 = tiny_jobs.losses("lora-packed", "cuda", "bf16", "lora", **PACKED)
    torch_attention = tiny_jobs.losses("lora-packed-torch-attention", "cuda", "bf16", "lora",
                                       model={"attention_kernel": "torch"}, **PACKED)
    assert len(fa4) == len(torch_attention) > 1
    assert worst_step_rel(torch_attention, fa4) <= GRAPHS_RTOL, (torch_attention, fa4)
