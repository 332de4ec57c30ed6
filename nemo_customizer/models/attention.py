"""Core attention for our layer spec: causal SDPA for padded batches, boundary-respecting attention for packed ones.

mcore's local ``DotProductAttention`` refuses packed sequences, so this module sits at
``self_attention.submodules.core_attention``. mcore calls it with query/key/value after RoPE:
padded (SBHD) q ``[sq, b, heads, head_dim]``, k/v ``[sk, b, kv_heads, head_dim]``, returns ``[sq, b, heads*head_dim]``;
packed (THD) q ``[t, heads, head_dim]``, k/v ``[t, kv_heads, head_dim]``, returns ``[t, heads*head_dim]``.

Sliding-window layers (mcore's ``window_size`` and ``window_attn_skip_freq``, set by ``models.llama.window_fields``)
let a query at position i attend keys j with ``i - W < j <= i`` of its own sequence, as transformers does; in a
packed batch the window restarts with each sequence. The flash kernels take the window as ``(W - 1, 0)``; SDPA gets
an explicit mask, built only where a sequence is longer than the window (shorter ones cannot tell the difference).

Softcapped layers (Gemma 2's ``attn_logit_softcapping``: scores become ``tanh(score / cap) * cap`` after the scale,
before the mask and softmax) cannot use SDPA or torch's varlen flash attention (they take no cap) nor FlashAttention-4
(it caps the forward but not its backward). On CUDA they run PyTorch's FlexAttention (``models.flex_softcap``: fused,
compiled kernels with the cap as a ``score_mod`` and the causal, per-sequence, windowed mask as a block mask built
once per forward per window kind) for packed batches, and for padded batches in training (``sq == sk``, no padding
mask). Everything else runs :func:`softcapped_attention`, which materializes the fp32 scores of each sequence: CPU,
attention dropout (FlexAttention has none), and padded batches outside training (generation with a KV cache, whose
queries are the last of the keys, left-padded prompts, scoring), which would otherwise pay FlexAttention's compile on
their first requests and again for a second length. CUDA graphs cannot replay either (the block mask is built from the
sequence bounds each step; the per-sequence path reads them on the host):
``config.validate.check_softcapped_attention`` refuses the combination before a job.
"""

from __future__ import annotations

import functools
import inspect
import logging
import math
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.utils import is_layer_window_attention

from nemo_customizer.models import flex_softcap
from nemo_customizer.models.flash_attn4 import packed_causal_attention, use_flash_attn4
from nemo_customizer.models.rope import PackedRotaryParams, rotate
from nemo_customizer.models.softcap import softcap

logger = logging.getLogger(__name__)


def _varlen_attn():
    """``torch.nn.attention.varlen.varlen_attn`` (flash attention over packed sequences), or None if absent."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


def _torch_at_least(major: int, minor: int) -> bool:
    version = torch.__version__.split("+")[0].split(".")
    return (int(version[0]), int(version[1])) >= (major, minor)


def causal_mask(sq: int, sk: int, device: torch.device, window: Optional[int] = None) -> torch.Tensor:
    """``[sq, sk]`` (True = attend) for queries at the last ``sq`` of ``sk`` positions (bottom-right aligned, as
    when decoding with a KV cache): query position i attends keys j <= i, and with a ``window`` only j > i - window."""
    query = torch.arange(sk - sq, sk, device=device)[:, None]
    key = torch.arange(sk, device=device)[None, :]
    allowed = key <= query
    return allowed if window is None else allowed & (key > query - window)


def packed_causal_mask(cu_seqlens: torch.Tensor, total: int, window: Optional[int] = None) -> torch.Tensor:
    """Block-diagonal causal mask ``[t, t]`` (True = attend) for sequences packed back to back; with a ``window``,
    each query also sees only the ``window`` positions up to its own.

    The reference semantics of packed attention (``CoreAttention`` computes the same per sequence, without the mask).
    """
    lengths = cu_seqlens[1:] - cu_seqlens[:-1]
    segment = torch.repeat_interleave(torch.arange(len(lengths), device=cu_seqlens.device), lengths)
    if segment.numel() < total:  # padding after the last sequence attends only to itself
        pad = torch.arange(len(lengths), len(lengths) + total - segment.numel(), device=cu_seqlens.device)
        segment = torch.cat([segment, pad])
    position = torch.arange(total, device=cu_seqlens.device)
    allowed = (segment[:, None] == segment[None, :]) & (position[:, None] >= position[None, :])
    return allowed if window is None else allowed & (position[:, None] - position[None, :] < window)


def _expand_kv(tensor: torch.Tensor, heads: int) -> torch.Tensor:
    """Heads on dim 1 (``[t, kv_heads, d]`` or ``[b, kv_heads, s, d]``) → ``heads`` of them: query head h reads
    key/value head ``h // (heads / kv_heads)``."""
    return tensor.repeat_interleave(heads // tensor.shape[1], dim=1)


def softcapped_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                         allowed: Optional[torch.Tensor], scale: float, cap: float,
                         dropout_p: float = 0.0) -> torch.Tensor:
    """Attention over softcapped scores, ``softmax(tanh(q·k * scale / cap) * cap)`` where ``allowed``, as
    transformers' eager attention computes it for Gemma 2 (scores and softmax in fp32 here, also for bf16 inputs,
    as flash kernels keep them).

    query ``(b, heads, sq, d)``, key/value ``(b, kv_heads, sk, d)`` (GQA: each group's head read by its query heads),
    ``allowed`` bool broadcastable to ``(b, heads, sq, sk)`` (True = attend; every query must see a key) or None
    (every key) → ``(b, heads, sq, d)``. The ``(b, heads, sq, sk)`` fp32 scores exist in memory and are kept for
    backward: no fused kernel.
    """
    heads = query.shape[1]
    if key.shape[1] != heads:
        key, value = _expand_kv(key, heads), _expand_kv(value, heads)
    scores = softcap(torch.matmul(query.float(), key.float().transpose(-2, -1)) * scale, cap)  # (b, heads, sq, sk)
    if allowed is not None:
        scores = scores.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(scores, dim=-1).to(value.dtype)
    if dropout_p > 0:
        probs = F.dropout(probs, p=dropout_p)
    return torch.matmul(probs, value)


@functools.lru_cache(maxsize=None)
def _say_softcapped_layers_run_flex_attention() -> None:
    logger.warning("attention-logit softcapping: the softcapped layers' attention runs PyTorch's FlexAttention on the "
                   "GPU (flash attention kernels here cannot softcap in backward), compiled on first use and once "
                   "more for a second sequence length; generation, and training with attention dropout, attend "
                   "each sequence with materialized scores")


class CoreAttention(MegatronModule):
    """Scaled dot-product attention with GQA, for padded and packed batches, on CPU and CUDA.

    ``attention_kernel`` (``model.attention_kernel``, passed through the layer spec) picks the flash attention that
    packed batches get on GPUs: see ``models.flash_attn4``. Every kernel here honours a sliding window, and a
    window is a Python number, so windowed packed attention is captured in CUDA graphs like full attention.
    ``logit_softcapping`` (``attn_logit_softcapping``, passed through the layer spec): this layer runs FlexAttention
    on CUDA or :func:`softcapped_attention` instead (module docstring).
    """

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: Optional[float] = None,
        softmax_scale: Optional[float] = None,
        cp_comm_type: Optional[str] = None,
        pg_collection=None,
        attention_kernel: str = "auto",
        logit_softcapping: Optional[float] = None,
    ):
        super().__init__(config=config)
        if config.context_parallel_size > 1:
            raise ValueError("context parallelism is not supported by nemo_customizer's core attention")
        self.attn_mask_type = attn_mask_type
        self.softmax_scale = softmax_scale or 1.0 / math.sqrt(config.kv_channels)
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout
        self.attention_kernel = attention_kernel
        self.softcap = logit_softcapping
        windowed = is_layer_window_attention(config.window_size, config.window_attn_skip_freq, layer_number)
        # HF's sliding_window of this layer (the keys a query sees, its own included); None: the whole sequence
        self.window: Optional[int] = config.window_size[0] + 1 if windowed else None
        varlen = _varlen_attn()
        self._varlen = varlen
        self._varlen_has_gqa = varlen is not None and "enable_gqa" in inspect.signature(varlen).parameters
        self._varlen_native_gqa = varlen is not None and (self._varlen_has_gqa or _torch_at_least(2, 11))
        # Tests set it to run the FlexAttention path on CPU, uncompiled and forward only (models.flex_softcap).
        self._flex_on_cpu = False

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: Optional[torch.Tensor],
        attn_mask_type: Optional[AttnMaskType] = None,
        attention_bias: Optional[torch.Tensor] = None,
        packed_seq_params: Optional[PackedSeqParams] = None,
    ) -> torch.Tensor:
        if attention_bias is not None:
            raise ValueError("attention_bias is not supported")
        if packed_seq_params is not None:
            return self._packed(query, key, value, packed_seq_params)
        mask_type = self.attn_mask_type if attn_mask_type is None else attn_mask_type
        return self._padded(query, key, value, attention_mask, mask_type)

    def _dropout(self) -> float:
        return self.dropout_p if self.training else 0.0

    def _flex_softcap(self, query: torch.Tensor) -> bool:
        """Whether this softcapped layer runs FlexAttention for ``query`` (module docstring): on CUDA, with no
        attention dropout (FlexAttention has none) and heads its kernels take."""
        if self.softcap is None or not (query.is_cuda or self._flex_on_cpu):
            return False
        if query.is_cuda:
            _say_softcapped_layers_run_flex_attention()
        return (self._dropout() == 0 and query.shape[-1] >= flex_softcap.MIN_HEAD_DIM
                and flex_softcap.available())

    def _flex(self, q, k, v, block_mask) -> torch.Tensor:
        """q ``(b, heads, s, d)``, k/v ``(b, kv_heads, s, d)`` → ``(b, heads, s, d)`` through FlexAttention."""
        return flex_softcap.flex_softcapped_attention(q, k, v, block_mask, self.softmax_scale, self.softcap,
                                                      compiled=q.is_cuda)

    def _window_over(self, length: int) -> Optional[int]:
        """The window, where a sequence of ``length`` keys is longer than it (else the window changes nothing)."""
        return self.window if self.window is not None and length > self.window else None

    def _padded(self, query, key, value, attention_mask, mask_type) -> torch.Tensor:
        sq, b, heads, head_dim = query.shape
        sk = key.shape[0]
        window = self._window_over(sk)
        q = query.permute(1, 2, 0, 3)  # (b, heads, sq, head_dim)
        k = key.permute(1, 2, 0, 3)  # (b, kv_heads, sk, head_dim)
        v = value.permute(1, 2, 0, 3)
        if (self.training and attention_mask is None and sq == sk and mask_type == AttnMaskType.causal
                and self._flex_softcap(q)):  # training rows (module docstring); GQA read in the kernel
            out = self._flex(q, k, v, flex_softcap.causal_block_mask(sq, window, q.device))
            return out.permute(2, 0, 1, 3).reshape(sq, b, heads * head_dim)
        if q.is_cuda and k.shape[1] != heads:  # CUDA SDPA's fused kernels take no GQA; see _packed
            k, v = _expand_kv(k, heads), _expand_kv(v, heads)
        # mcore's attention_mask is True where attention is NOT allowed (e.g. left padding of batched prompts),
        # broadcastable to (b, heads, sq, sk).
        allowed = None if attention_mask is None else ~attention_mask
        is_causal = False
        # mcore hands decode steps (one query per row after the prompt) over as no_mask, the query seeing every
        # cached key; a windowed layer must still drop the keys that fell out of its window.
        if mask_type == AttnMaskType.causal or window is not None:
            if allowed is None and sq == sk and window is None and self.softcap is None:
                is_causal = True  # lets SDPA pick its fused causal kernel
            else:  # queries are the last sq positions (decoding with a KV cache): bottom-right aligned causal
                causal = causal_mask(sq, sk, q.device, window)
                allowed = causal if allowed is None else allowed & causal
        if attention_mask is not None:
            # A padding query would otherwise see no key at all; SDPA then returns NaN, which leaks into real
            # positions through 0 * NaN. Let every query see its own position.
            allowed = allowed | torch.eye(sq, sk, dtype=torch.bool, device=q.device).roll(sk - sq, dims=1)
        if self.softcap is not None:
            out = softcapped_attention(q, k, v, allowed, self.softmax_scale, self.softcap, self._dropout())
        else:
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=allowed, dropout_p=self._dropout(), is_causal=is_causal,
                scale=self.softmax_scale, enable_gqa=k.shape[1] != heads,
            )  # (b, heads, sq, head_dim)
        return out.permute(2, 0, 1, 3).reshape(sq, b, heads * head_dim)

    def _packed(self, query, key, value, params: PackedSeqParams) -> torch.Tensor:
        if query.dim() == 4:  # some mcore paths keep the singleton batch dim: [t, 1, heads, head_dim]
            query, key, value = query.squeeze(1), key.squeeze(1), value.squeeze(1)
        total, heads, head_dim = query.shape
        window = self._window_over(total if params.max_seqlen_kv is None else int(params.max_seqlen_kv))
        if isinstance(params, PackedRotaryParams):
            query, key = rotate(query, key, params.rotary_cos, params.rotary_sin)
        if self._flex_softcap(query):  # one row of t tokens: (1, heads, t, head_dim), GQA read in the kernel
            out = self._flex(query.transpose(0, 1)[None], key.transpose(0, 1)[None], value.transpose(0, 1)[None],
                             flex_softcap.packed_block_mask(params, total, window))
            return out[0].transpose(0, 1).reshape(total, heads * head_dim)
        gqa = key.shape[1] != heads
        # bf16/fp16 only, and no softcap (module docstring)
        flashable = query.dtype in (torch.float16, torch.bfloat16) and self.softcap is None
        flash4 = flashable and use_flash_attn4(self.attention_kernel, query.device, head_dim)
        flash = flash4 or (query.is_cuda and self._varlen is not None and flashable)
        if query.is_cuda and gqa and not (flash4 or (flash and self._varlen_native_gqa)):
            # Without native GQA, give every query head its own copy of its group's key/value head: CUDA SDPA
            # with enable_gqa falls back to the slow math kernel (fp32 bmm + softmax), a large share of a step.
            key, value = _expand_kv(key, heads), _expand_kv(value, heads)
            gqa = False
        if flash:
            cu_q = params.cu_seqlens_q.to(torch.int32)
            cu_k = params.cu_seqlens_kv.to(torch.int32)
            max_q = int(params.max_seqlen_q)
            max_k = int(params.max_seqlen_kv)
            if self._dropout() > 0:
                raise ValueError("attention dropout is not supported with packed sequences on CUDA")
            if flash4:  # key/value heads of a group are read by each of its query heads in the kernel (GQA)
                out = packed_causal_attention(query, key, value, cu_q, cu_k, max_q, max_k, self.softmax_scale,
                                              window=window)
                return out.reshape(total, heads * head_dim)
            # Flash attention reads a group's key/value head for each of its query heads itself. torch 2.11's
            # varlen_attn has no enable_gqa flag but passes the heads through unchecked (the same outputs and
            # gradients as expanded heads, without the copies); later versions want the flag.
            kwargs = {"enable_gqa": True} if gqa and self._varlen_has_gqa else {}
            # (left, right) keys around each query, as flash attention counts them: (-1, 0) is causal.
            window_size = (-1, 0) if window is None else (window - 1, 0)
            out = self._varlen(
                query, key, value, cu_q, cu_k, max_q, max_k, scale=self.softmax_scale, window_size=window_size, **kwargs
            )  # (t, heads, head_dim)
            return out.reshape(total, heads * head_dim)
        # One causal SDPA per sequence (same result as SDPA with packed_causal_mask): the work grows with the sum of
        # squared lengths instead of t², and SDPA can take its fused causal kernel; a block-diagonal [t, t] mask
        # would compute and then discard every cross-sequence score. A sequence longer than the window gets the
        # window's mask instead of the fused causal kernel; a softcapped layer gets its causal (windowed) mask.
        q, k, v = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)  # (heads | kv_heads, t, head_dim)
        bounds = params.cu_seqlens_q.tolist()
        outs = []
        for s, e in zip(bounds[:-1], bounds[1:]):
            if e == s:
                continue
            seq_window = self._window_over(e - s)
            if self.softcap is not None:
                outs.append(softcapped_attention(
                    q[None, :, s:e], k[None, :, s:e], v[None, :, s:e], causal_mask(e - s, e - s, q.device, seq_window),
                    self.softmax_scale, self.softcap, self._dropout())[0])
                continue
            mask = None if seq_window is None else causal_mask(e - s, e - s, q.device, seq_window)
            outs.append(F.scaled_dot_product_attention(
                q[:, s:e], k[:, s:e], v[:, s:e], attn_mask=mask, dropout_p=self._dropout(), is_causal=mask is None,
                scale=self.softmax_scale, enable_gqa=gqa))
        if bounds[-1] < total:  # padding not covered by cu_seqlens attends only to itself (as in packed_causal_mask)
            outs.append(v[:, bounds[-1]:].repeat_interleave(heads // v.shape[0], dim=0))
        out = torch.cat(outs, dim=1)  # (heads, t, head_dim)
        return out.transpose(0, 1).reshape(total, heads * head_dim)
