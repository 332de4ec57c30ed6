"""Softcapped attention (Gemma 2's ``attn_logit_softcapping``) on CUDA with PyTorch's FlexAttention.

No flash kernel here softcaps in backward: torch's varlen flash attention takes no cap, FlashAttention-4 caps only its
forward. FlexAttention generates fused Triton kernels, forward and backward, from a ``score_mod`` (here
``tanh(score / cap) * cap``, applied to the scaled scores in the kernel's fp32 accumulator, also for bf16 inputs; its
derivative comes from autograd of the ``score_mod``) and a ``BlockMask``: which key blocks each query block reads,
plus a ``mask_mod`` evaluated on the blocks that are only partly allowed. The scores never exist in memory, and the
blocks outside a query's sequence or window are skipped.

The mask is causal within each sequence (packed rows: document ids from ``cu_seqlens``; tokens after the last
boundary see only themselves, as ``models.attention.packed_causal_mask`` says) and, for a sliding-window layer, limited
to the window. Building a block mask evaluates the ``mask_mod`` on a ``[t, t]`` grid and orders the blocks, so it is
built once per forward per window kind (cached on the packed batch's params; padded batches: per length and window),
not once per layer. It reads nothing back to the host.

``flex_attention`` is compiled on first CUDA use with torch.compile's default shape handling: the first token count
compiles a kernel for that count, a second one recompiles once with the count symbolic (``dynamic=True`` would also
turn the Python float ``scale`` into a tensor read back on the host). Uncompiled, FlexAttention materializes the
scores, and on CPU it has no backward: CPU runs keep ``models.attention.softcapped_attention``, and CPU tests call
this path uncompiled, forward only.
"""

from __future__ import annotations

import functools
from typing import Callable, Optional

import torch
from megatron.core.packed_seq_params import PackedSeqParams

_CACHE_ATTRIBUTE = "_softcap_block_masks"  # on a PackedSeqParams: {(total, window): (cu_seqlens, version, mask)}
MIN_HEAD_DIM = 16  # FlexAttention's Triton kernels take no smaller head (tl.dot)


@functools.lru_cache(maxsize=None)
def available() -> bool:
    """Whether this torch has FlexAttention (``torch.nn.attention.flex_attention``)."""
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


@functools.lru_cache(maxsize=None)
def _flex_attention(compiled: bool) -> Callable:
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention) if compiled else flex_attention


@functools.lru_cache(maxsize=None)
def softcap_score_mod(cap: float) -> Callable:
    """The ``score_mod`` capping a scaled score at ``tanh(score / cap) * cap``; one function object per cap, so the
    compiled kernel's guards see the same function every layer and step."""
    def capped(score, batch, head, q_idx, kv_idx):
        return torch.tanh(score / cap) * cap

    return capped


def _mask_mod(document: torch.Tensor, window: torch.Tensor) -> Callable:
    """Query ``q_idx`` reads key ``kv_idx`` of its own document at or before it, fewer than ``window`` positions back.

    ``document`` ``[t]`` int32 and ``window`` (a 0-d int32 tensor: a full layer gets the row length) are tensors,
    not Python numbers: every call builds a new closure of the same code, which the compiled kernel takes without
    recompiling (a captured Python int would be guarded on its value: full and windowed layers would alternate).
    """
    def allowed(batch, head, q_idx, kv_idx):
        return (document[q_idx] == document[kv_idx]) & (q_idx >= kv_idx) & (q_idx - kv_idx < window)

    return allowed


def _block_mask(document: torch.Tensor, window: Optional[int]):
    from torch.nn.attention.flex_attention import create_block_mask

    total = document.numel()
    span = torch.full((), total if window is None else window, dtype=torch.int32, device=document.device)
    # B, H None: one mask broadcast over the batch and the heads
    return create_block_mask(_mask_mod(document, span), None, None, total, total, device=document.device)


def packed_documents(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """Each of ``total`` packed tokens' sequence index ``[t]`` int32, computed on the device (no host read); a token
    after ``cu_seqlens[-1]`` gets an index of its own, so that it sees only itself."""
    cu = cu_seqlens.to(torch.int32)
    position = torch.arange(total, dtype=torch.int32, device=cu.device)
    document = torch.searchsorted(cu[1:], position, right=True, out_int32=True)  # empty segments skip themselves
    return torch.where(position >= cu[-1], cu.numel() - 1 + position, document)


def packed_block_mask(params: PackedSeqParams, total: int, window: Optional[int]):
    """The ``BlockMask`` of a packed row of ``total`` tokens with ``params.cu_seqlens_q`` (self-attention), limited
    to ``window`` keys per query where not None; cached on ``params``, which every layer of a forward shares.

    A cached mask is reused only for the same ``cu_seqlens_q`` tensor, unchanged in place since (its version)."""
    cu = params.cu_seqlens_q
    version = None if cu.is_inference() else cu._version  # inference tensors keep no version
    cache = params.__dict__.setdefault(_CACHE_ATTRIBUTE, {})
    cached = cache.get((total, window))
    if cached is not None and cached[0] is cu and cached[1] == version:
        return cached[2]
    mask = _block_mask(packed_documents(cu, total), window)
    cache[(total, window)] = (cu, version, mask)
    return mask


@functools.lru_cache(maxsize=16)
def causal_block_mask(length: int, window: Optional[int], device: torch.device):
    """The ``BlockMask`` of padded rows of ``length`` positions: causal, ``window`` keys per query where not None.
    Fixed by its arguments, so kept for the next layer and step."""
    return _block_mask(torch.zeros(length, dtype=torch.int32, device=device), window)


def flex_softcapped_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, block_mask,
                              scale: float, cap: float, compiled: bool = True) -> torch.Tensor:
    """``softmax(tanh(q·k * scale / cap) * cap)`` over the keys ``block_mask`` allows, times v: what
    ``models.attention.softcapped_attention`` computes with that mask, in fused kernels.

    query ``(b, heads, s, d)``, key/value ``(b, kv_heads, s, d)`` (GQA: the kernel reads a group's key/value head for
    each of its query heads) → ``(b, heads, s, d)``; a packed row is ``b = 1``. ``compiled``: through
    ``torch.compile`` (CUDA); uncompiled the scores are materialized, and a CPU call has no backward."""
    return _flex_attention(compiled)(query, key, value, score_mod=softcap_score_mod(float(cap)),
                                     block_mask=block_mask, scale=scale,
                                     enable_gqa=key.shape[1] != query.shape[1])
