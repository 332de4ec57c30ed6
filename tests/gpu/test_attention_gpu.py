"""Packed (THD, varlen flash) attention on CUDA: the attention module against fp32 attention per sequence, with GQA,
for torch's kernel and FlashAttention-4, with and without a sliding window, and softcapped (Gemma 2: FlexAttention);
and a whole model's packed logits against its unpacked ones."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.gpu


def _packed_gqa_attention_error(generator: torch.Generator, kernel: str, window: int | None = None,
                                softcap: float | None = None) -> tuple[float, bool]:
    """Packed flash attention with 8 key/value heads for 32 query heads, as the model calls it (``CoreAttention``,
    heads not expanded where the flash kernel takes GQA), bf16, against fp32 causal attention per sequence with
    expanded heads: the largest relative norm of the difference over out, d_q, d_k, d_v, and whether the module
    expanded the key/value heads. ``kernel``: ``model.attention_kernel``. ``window``: a sliding window (HF's
    ``sliding_window``) shorter than the longer sequences, restarting with each of them. ``softcap``: attention scores
    capped at ``tanh(score / cap) * cap`` (``attn_logit_softcapping``)."""
    from megatron.core.packed_seq_params import PackedSeqParams
    from megatron.core.transformer.enums import AttnMaskType

    from _tiny import tiny_arch
    from nemo_customizer.models.attention import CoreAttention, causal_mask
    from nemo_customizer.models.gpt import transformer_config

    arch = tiny_arch(heads=32, kv_heads=8, hidden=32 * 64, sliding_window=window)
    attention = CoreAttention(transformer_config(arch), 1,
                              AttnMaskType.causal, "self", attention_kernel=kernel, logit_softcapping=softcap)
    lengths = [700, 13, 1500, 1, 380, 1502, 0, 0]  # empty segments at the end, as CUDA graphs pad cu_seqlens
    total = sum(lengths)
    cu = torch.tensor([0] + lengths, dtype=torch.int32).cumsum(0).to(torch.int32).cuda()
    params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=max(lengths),
                             max_seqlen_kv=max(lengths))
    inputs = [torch.randn(total, h, 64, generator=generator).cuda() for h in (32, 8, 8)]  # (T, heads, D): q, k, v
    upstream = torch.randn(total, 32 * 64, generator=generator).cuda()

    def outputs_and_grads(dtype, fn):
        leaves = [t.to(dtype).requires_grad_() for t in inputs]
        out = fn(*leaves)
        return [t.float() for t in (out, *torch.autograd.grad(out, leaves, upstream.to(dtype)))]

    def reference(q, k, v):
        k, v = k.repeat_interleave(4, dim=1), v.repeat_interleave(4, dim=1)
        outs = []
        for s, e in zip(cu[:-1].tolist(), cu[1:].tolist()):
            if e == s:
                continue
            mask = None if window is None else causal_mask(e - s, e - s, q.device, window)
            if softcap is not None:
                scores = q[s:e].transpose(0, 1) @ k[s:e].transpose(0, 1).transpose(1, 2) / 8.0  # 1/√64
                scores = (torch.tanh(scores / softcap) * softcap).masked_fill(
                    ~causal_mask(e - s, e - s, q.device, window), float("-inf"))
                outs.append((scores.softmax(-1) @ v[s:e].transpose(0, 1)).transpose(0, 1).reshape(e - s, -1))
                continue
            outs.append(torch.nn.functional.scaled_dot_product_attention(
                q[s:e].transpose(0, 1), k[s:e].transpose(0, 1), v[s:e].transpose(0, 1), attn_mask=mask,
                is_causal=mask is None,
            ).transpose(0, 1).reshape(e - s, -1))
        return torch.cat(outs)

    ours = outputs_and_grads(torch.bfloat16, lambda q, k, v: attention(q, k, v, None, packed_seq_params=params))
    expected = outputs_and_grads(torch.float32, reference)
    worst = max(((a - b).norm() / b.norm()).item() for a, b in zip(ours, expected))
    return worst, not attention._varlen_native_gqa


def test_packed_gqa_attention_matches_fp32_per_sequence(generator):
    worst, expanded = _packed_gqa_attention_error(generator, "torch")
    assert worst <= 2e-2, f"torch's flash attention{' (heads expanded)' if expanded else ''}: {worst:.2e}"


def test_packed_gqa_flash_attn4_matches_fp32_per_sequence(generator, flash_attn4):
    worst, _ = _packed_gqa_attention_error(generator, "fa4")
    assert worst <= 2e-2, f"FlashAttention-4: {worst:.2e}"


WINDOW = 300  # shorter than three of the packed sequences, longer than the others


def test_packed_sliding_window_attention_matches_fp32_per_sequence(generator):
    """torch's flash attention with ``window_size=(W - 1, 0)`` is HF's window of W keys, restarting per sequence."""
    worst, _ = _packed_gqa_attention_error(generator, "torch", window=WINDOW)
    assert worst <= 2e-2, f"torch's flash attention, window {WINDOW}: {worst:.2e}"


def _count_flex_calls(monkeypatch) -> list:
    """The ``compiled`` flag of every FlexAttention call the attention module makes from now on."""
    from nemo_customizer.models import flex_softcap

    calls, real = [], flex_softcap.flex_softcapped_attention
    monkeypatch.setattr(flex_softcap, "flex_softcapped_attention",
                        lambda *a, **kw: calls.append(kw["compiled"]) or real(*a, **kw))
    return calls


@pytest.mark.parametrize("window", [WINDOW, None], ids=["window", "full"])
def test_packed_softcapped_attention_matches_fp32_per_sequence(generator, monkeypatch, window):
    """Softcapped scores (a cap the scores reach), with and without a sliding window: no flash kernel here softcaps
    in backward, so the module runs compiled FlexAttention (GQA in the kernel), whatever ``attention_kernel`` asks
    for; out and gradients against fp32 per sequence."""
    calls = _count_flex_calls(monkeypatch)
    worst, _ = _packed_gqa_attention_error(generator, "auto", window=window, softcap=2.0)
    assert calls == [True], "the packed softcapped layer did not run compiled FlexAttention"
    assert worst <= 2e-2, f"softcapped attention, window {window}: {worst:.2e}"


def test_padded_softcapped_training_attention_matches_fp32(generator, monkeypatch):
    """Padded training rows of a softcapped sliding-window layer (bf16, 32 query heads over 8 key/value heads) run
    FlexAttention with a causal block mask: out and gradients against fp32 ``softcapped_attention``."""
    from megatron.core.transformer.enums import AttnMaskType

    from _tiny import tiny_arch
    from nemo_customizer.models.attention import CoreAttention, causal_mask, softcapped_attention
    from nemo_customizer.models.gpt import transformer_config

    arch = tiny_arch(heads=32, kv_heads=8, hidden=32 * 64, sliding_window=WINDOW)
    attention = CoreAttention(transformer_config(arch), 1, AttnMaskType.causal, "self", logit_softcapping=2.0).train()
    calls = _count_flex_calls(monkeypatch)
    s, b = 1100, 2
    inputs = [torch.randn(s, b, h, 64, generator=generator).cuda() for h in (32, 8, 8)]  # mcore's (s, b, heads, d)
    upstream = torch.randn(s, b, 32 * 64, generator=generator).cuda()

    def reference(q, k, v):
        q, k, v = (t.permute(1, 2, 0, 3) for t in (q, k, v))  # (b, heads, s, d)
        out = softcapped_attention(q, k, v, causal_mask(s, s, q.device, WINDOW), attention.softmax_scale, 2.0)
        return out.permute(2, 0, 1, 3).reshape(s, b, -1)

    def outputs_and_grads(dtype, fn):
        leaves = [t.to(dtype).requires_grad_() for t in inputs]
        out = fn(*leaves)
        return [t.float() for t in (out, *torch.autograd.grad(out, leaves, upstream.to(dtype)))]

    ours = outputs_and_grads(torch.bfloat16, lambda q, k, v: attention(q, k, v, None))
    expected = outputs_and_grads(torch.float32, reference)
    assert calls == [True], "the padded softcapped training layer did not run compiled FlexAttention"
    worst = max(((a - b).norm() / b.norm()).item() for a, b in zip(ours, expected))
    assert worst <= 2e-2, f"padded softcapped attention, window {WINDOW}: {worst:.2e}"


def test_packed_sliding_window_flash_attn4_matches_fp32_per_sequence(generator, flash_attn4):
    worst, _ = _packed_gqa_attention_error(generator, "fa4", window=WINDOW)
    assert worst <= 2e-2, f"FlashAttention-4, window {WINDOW}: {worst:.2e}"


@pytest.fixture(scope="module", params=[None, 32], ids=["full", "window32"])
def packed_model(tmp_path_factory, request):
    """A tiny random Llama with GQA (4 query, 2 key/value heads) on CUDA, in a CUDA parallel state; once with a
    sliding window shorter than most test sequences (packed: the flash kernel's window; unpacked: SDPA's mask)."""
    from _tiny import load_tiny_model, tiny_arch, write_tiny_checkpoint
    from nemo_customizer.distributed.parallel import destroy_parallel, initialize_parallel

    arch = tiny_arch(heads=4, kv_heads=2, hidden=128, sliding_window=request.param)
    directory = tmp_path_factory.mktemp("packed")
    write_tiny_checkpoint(directory, arch)
    layout = initialize_parallel(tensor_parallel_size=1, pipeline_parallel_size=1, device=torch.device("cuda"),
                                 seed=0)
    try:
        yield arch, load_tiny_model(arch, directory).cuda().eval()
    finally:
        destroy_parallel(layout)


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 2e-3), (torch.bfloat16, 3e-2)], ids=["fp32", "bf16"])
def test_packed_logits_match_unpacked(packed_model, dtype, tolerance):
    from megatron.core.packed_seq_params import PackedSeqParams

    from nemo_customizer.models.gpt import forward_logits

    arch, model = packed_model
    generator = torch.Generator().manual_seed(0)
    sequences = [torch.randint(0, arch.vocab_size, (n,), generator=generator).cuda() for n in (37, 5, 90, 64)]
    cu = torch.tensor([0, 37, 42, 132, 196], dtype=torch.int32, device="cuda")
    params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=90, max_seqlen_kv=90)
    positions = torch.cat([torch.arange(len(s), device="cuda") for s in sequences])[None]
    model.to(dtype)
    with torch.no_grad():
        packed = model(torch.cat(sequences)[None], positions, None, packed_seq_params=params,
                       runtime_gather_output=True)[0].float()
        unpacked = torch.cat([forward_logits(model, s[None])[0] for s in sequences]).float()
    rel = ((packed - unpacked).norm() / unpacked.norm()).item()
    assert rel <= tolerance
