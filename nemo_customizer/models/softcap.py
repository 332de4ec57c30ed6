"""Logit softcapping (Gemma 2): ``tanh(x / cap) * cap`` bends values smoothly into ``(-cap, cap)``, nearly the
identity well inside the cap. Attention scores get it in ``models.attention``; output logits on the output layer
(``models.gpt``) and in the loss head (``models.loss``, ``models.loss_kernel``)."""

from __future__ import annotations

import torch


def softcap(x: torch.Tensor, cap: float) -> torch.Tensor:
    """``tanh(x / cap) * cap``, in ``x``'s dtype (as transformers computes it)."""
    return torch.tanh(x / cap) * cap


def softcap_slope(capped: torch.Tensor, cap: float) -> torch.Tensor:
    """The derivative of :func:`softcap` at the point whose capped value is ``capped``: ``1 - tanh²``."""
    return 1.0 - (capped / cap).square()
