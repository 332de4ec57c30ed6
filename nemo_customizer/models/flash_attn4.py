"""FlashAttention-4 for packed sequences: the ``flash-attn-4`` package's CuTe DSL kernels (``flash_attn.cute``).

An optional speed-up on Hopper and Blackwell GPUs (compute capability 9.x, 10.x) over torch's own flash attention
(FlashAttention-2, ``torch.nn.attention.varlen``), which stays the fallback: ``pip install nemo_customizer[fa4]``.
Its kernels are compiled on first use (seconds per head size and direction, then cached for the process), and take
any token count and segment boundaries without recompiling.

Which kernel a packed batch gets is ``model.attention_kernel``: ``auto`` (this one where it is installed and the GPU
supports it), ``torch``, or ``fa4`` (required: a ConfigError before any work where it cannot run).
"""

from __future__ import annotations

import functools
from typing import Callable, Optional

import torch

SUPPORTED_CAPABILITIES = (9, 10)  # the SM90 and SM100 kernels; SM80/SM120 ones exist but are not faster than FA2


@functools.lru_cache(maxsize=None)
def _load() -> tuple[Optional[Callable], str]:
    """``(flash_attn_varlen_func, "")``, or ``(None, why)`` where the package is missing or does not load."""
    try:
        from flash_attn.cute import flash_attn_varlen_func
    except ImportError as exc:
        return None, f"flash-attn-4 is not importable ({exc}); pip install 'nemo_customizer[fa4]'"
    except Exception as exc:  # noqa: BLE001 - a broken install (no CUDA toolkit flavor, ...) must not stop training
        return None, f"flash-attn-4 failed to load: {type(exc).__name__}: {exc}"
    return flash_attn_varlen_func, ""


@functools.lru_cache(maxsize=None)
def _capability_major(index: int) -> int:
    return torch.cuda.get_device_capability(index)[0]


def unavailable_reason(device: torch.device) -> str:
    """Why FlashAttention-4 cannot run on ``device``; empty when it can."""
    if device.type != "cuda":
        return f"it runs on CUDA GPUs, not {device.type}"
    major = _capability_major(device.index if device.index is not None else torch.cuda.current_device())
    if major not in SUPPORTED_CAPABILITIES:
        return f"it needs compute capability 9.x or 10.x (Hopper, Blackwell); this GPU has {major}.x"
    return _load()[1]


def takes_head_dim(head_dim: int) -> bool:
    """Whether the SM90/SM100 kernels take heads of this size."""
    return head_dim % 8 == 0 and 8 <= head_dim <= 256


def use_flash_attn4(kernel: str, device: torch.device, head_dim: int = 128) -> bool:
    """Whether a packed batch on ``device`` runs FlashAttention-4 under ``model.attention_kernel=kernel``."""
    if kernel == "torch" or device.type != "cuda":
        return False
    if kernel == "fa4":
        return True  # checked before the job started (api), or the call fails naming the cause
    return takes_head_dim(head_dim) and not unavailable_reason(device)  # auto: else torch's flash attention


def packed_causal_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, cu_seqlens_q: torch.Tensor,
                            cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int,
                            scale: float, window: Optional[int] = None) -> torch.Tensor:
    """Causal attention within each packed sequence: q ``[t, heads, d]``, k/v ``[t, kv_heads, d]`` (GQA read in the
    kernel) → ``[t, heads, d]``. ``cu_seqlens_*`` int32 ``[n + 1]``; empty segments get no work. ``window``: each
    query sees only the ``window`` keys up to its own (HF's ``sliding_window``; the kernel's ``(window - 1, 0)``)."""
    varlen, why = _load()
    if varlen is None:
        raise RuntimeError(f"model.attention_kernel=fa4: {why}")
    out, _ = varlen(query, key, value, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, max_seqlen_q=max_seqlen_q,
                    max_seqlen_k=max_seqlen_k, softmax_scale=scale, causal=True,
                    window_size=(None, None) if window is None else (window - 1, 0))
    return out
