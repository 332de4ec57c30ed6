"""Packed (THD) sequences: attention and RoPE restart at every boundary, so logits equal unpacked ones."""

import pytest
import torch
from megatron.core.packed_seq_params import PackedSeqParams

from nemo_customizer.models.attention import packed_causal_mask
from nemo_customizer.models.gpt import forward_logits

from _tiny import load_tiny_model, tiny_arch, write_tiny_checkpoint

pytestmark = pytest.mark.usefixtures("cpu_parallel")


def test_packed_causal_mask_is_block_diagonal():
    mask = packed_causal_mask(torch.tensor([0, 2, 5]), total=6)
    expected = torch.tensor([
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [0, 0, 1, 0, 0, 0],
        [0, 0, 1, 1, 0, 0],
        [0, 0, 1, 1, 1, 0],
        [0, 0, 0, 0, 0, 1],  # trailing padding sees only itself
    ], dtype=torch.bool)
    assert torch.equal(mask, expected)


def test_packed_logits_equal_unpacked(tmp_path, monkeypatch):
    import nemo_customizer.models.attention as attention

    rotations = []
    real_rotate = attention.rotate
    monkeypatch.setattr(attention, "rotate", lambda *a: rotations.append(1) or real_rotate(*a))
    arch = tiny_arch(heads=4, kv_heads=2)
    write_tiny_checkpoint(tmp_path, arch)
    model = load_tiny_model(arch, tmp_path).eval()
    gen = torch.Generator().manual_seed(6)
    sequences = [torch.randint(0, arch.vocab_size, (n,), generator=gen) for n in (7, 3, 11)]
    tokens = torch.cat(sequences)[None]  # (1, t)
    positions = torch.cat([torch.arange(len(s)) for s in sequences])[None]
    cu = torch.tensor([0, 7, 10, 21], dtype=torch.int32)
    params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=11, max_seqlen_kv=11)
    with torch.no_grad():
        packed = model(tokens, positions, None, packed_seq_params=params, runtime_gather_output=True)[0]
        unpacked = torch.cat([forward_logits(model, s[None])[0] for s in sequences])
    assert packed.shape == unpacked.shape
    assert (packed - unpacked).abs().max().item() <= 1e-5
    # RoPE of the packed batch came from the per-token table, once per layer (mcore's per-sequence path is skipped)
    assert len(rotations) == arch.num_hidden_layers


@pytest.mark.parametrize("cu, total", [([0, 7, 10, 21], 21), ([0, 4, 9], 12), ([0, 5], 5)])
def test_per_sequence_attention_equals_the_block_diagonal_mask(cu, total):
    """CoreAttention's CPU packed path (one causal SDPA per sequence) against SDPA with ``packed_causal_mask``,
    GQA, trailing padding outside cu_seqlens included."""
    from megatron.core.transformer.enums import AttnMaskType

    from nemo_customizer.models.attention import CoreAttention
    from nemo_customizer.models.gpt import transformer_config

    arch = tiny_arch(heads=4, kv_heads=2)
    attention = CoreAttention(transformer_config(arch), 1, AttnMaskType.causal, "self").eval()
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(total, 4, 16, generator=gen)
    k, v = torch.randn(total, 2, 16, generator=gen), torch.randn(total, 2, 16, generator=gen)
    cu = torch.tensor(cu, dtype=torch.int32)
    params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=total,
                             max_seqlen_kv=total)
    out = attention(q, k, v, None, packed_seq_params=params)
    expected = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), attn_mask=packed_causal_mask(cu, total),
        scale=attention.softmax_scale, enable_gqa=True).transpose(0, 1).reshape(total, 64)
    assert (out - expected).abs().max().item() <= 1e-5
