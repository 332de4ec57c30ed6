"""Softcapped attention through FlexAttention (``models.flex_softcap``), run on CPU uncompiled: the packed and padded
paths of ``CoreAttention`` against ``softcapped_attention`` with the reference masks, with GQA and a sliding window,
and one block mask per forward per window kind. FlexAttention has no backward on CPU: gradients are checked on the
GPU (``tests/gpu/test_attention_gpu.py``)."""

from __future__ import annotations

import pytest
import torch
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.enums import AttnMaskType

from nemo_customizer.models import flex_softcap
from nemo_customizer.models.attention import (CoreAttention, causal_mask, packed_causal_mask,
                                              softcapped_attention)

from _tiny import tiny_arch

pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")

CAP = 0.5  # scores of unit-variance inputs reach it: the cap changes the result
WINDOW = 5  # shorter than two of the packed sequences


def _attention(layer: int = 1, window: int | None = WINDOW, flex: bool = True) -> CoreAttention:
    """A softcapped layer with 4 query heads of 16 over 2 key/value heads (``layer_types``: layer 1 slides over
    ``window`` keys, layer 2 sees its whole sequence)."""
    from nemo_customizer.models.gpt import transformer_config

    arch = tiny_arch(heads=4, kv_heads=2, sliding_window=window,
                     layer_types=None if window is None else ["sliding_attention", "full_attention"])
    attention = CoreAttention(transformer_config(arch), layer, AttnMaskType.causal, "self", logit_softcapping=CAP)
    attention._flex_on_cpu = flex
    return attention.eval()


def _qkv(total: int, batch: tuple[int, ...] = ()):
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(*batch, total, h, 16, generator=gen) for h in (4, 2, 2)]


def _params(cu: list[int], total: int) -> PackedSeqParams:
    cu = torch.tensor(cu, dtype=torch.int32)
    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=total,
                           max_seqlen_kv=total)


def test_packed_documents_give_each_trailing_token_its_own_index():
    documents = flex_softcap.packed_documents(torch.tensor([0, 3, 3, 5, 9], dtype=torch.int32), 12)
    assert documents.tolist() == [0, 0, 0, 2, 2, 3, 3, 3, 3, 13, 14, 15]  # the empty segment 1 has no token


@pytest.mark.parametrize("layer, window", [(1, WINDOW), (2, WINDOW), (1, None)], ids=["window", "full", "no-window"])
@pytest.mark.parametrize("cu, total", [([0, 7, 10, 21], 21), ([0, 4, 4, 12], 14)], ids=["packed", "empty+trailing"])
def test_packed_flex_equals_softcapped_attention(layer, window, cu, total):
    attention = _attention(layer, window)
    q, k, v = _qkv(total)
    with torch.no_grad():
        out = attention(q, k, v, None, packed_seq_params=_params(cu, total))
    allowed = packed_causal_mask(torch.tensor(cu), total, attention.window)
    expected = softcapped_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                                    allowed, attention.softmax_scale, CAP)[0].transpose(0, 1).reshape(total, 64)
    assert (out - expected).abs().max().item() <= 1e-5
    per_sequence = _attention(layer, window, flex=False)
    with torch.no_grad():
        assert (out - per_sequence(q, k, v, None, packed_seq_params=_params(cu, total))).abs().max().item() <= 1e-5


@pytest.mark.parametrize("layer", [1, 2], ids=["window", "full"])
def test_padded_training_flex_equals_softcapped_attention(layer, monkeypatch):
    attention = _attention(layer).train()
    q, k, v = _qkv(9, batch=(3,))  # (b, s, heads, d)
    q, k, v = (t.transpose(0, 1) for t in (q, k, v))  # mcore's (s, b, heads, d)
    calls, real = [], flex_softcap.flex_softcapped_attention
    monkeypatch.setattr(flex_softcap, "flex_softcapped_attention", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    with torch.no_grad():
        out = attention(q, k, v, None)
    assert calls == [1]
    bhsd = [t.permute(1, 2, 0, 3) for t in (q, k, v)]
    expected = softcapped_attention(*bhsd, causal_mask(9, 9, q.device, attention.window), attention.softmax_scale,
                                    CAP).permute(2, 0, 1, 3).reshape(9, 3, 64)
    assert (out - expected).abs().max().item() <= 1e-5


def test_dropout_generation_and_cpu_keep_the_materialized_path():
    q = torch.randn(2, 4, 9, 16)
    attention = _attention()
    attention.train()
    assert attention._flex_softcap(q)
    attention.dropout_p = 0.1
    assert not attention._flex_softcap(q)  # FlexAttention has no dropout
    assert not _attention(flex=False)._flex_softcap(q)  # CPU


def test_one_block_mask_per_forward_per_window_kind(monkeypatch):
    built = []
    real = flex_softcap._block_mask
    monkeypatch.setattr(flex_softcap, "_block_mask", lambda *a: built.append(a[1]) or real(*a))
    cu, total = [0, 7, 10, 21], 21
    params = _params(cu, total)
    q, k, v = _qkv(total)
    layers = [_attention(1), _attention(2), _attention(1), _attention(2)]  # windowed and full, alternating
    with torch.no_grad():
        for layer in layers:
            layer(q, k, v, None, packed_seq_params=params)
        assert built == [WINDOW, None]
        params.cu_seqlens_q.copy_(torch.tensor([0, 3, 10, 21]))  # changed in place: built again
        layers[0](q, k, v, None, packed_seq_params=params)
        assert built == [WINDOW, None, WINDOW]
        layers[0](q, k, v, None, packed_seq_params=_params(cu, total))  # a new forward's params
    assert built == [WINDOW, None, WINDOW, WINDOW]
