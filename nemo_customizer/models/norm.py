"""RMSNorm for our layer spec: HF-exact numerics and usable under sequence parallelism."""

from __future__ import annotations

import torch
from megatron.core.transformer.transformer_config import TransformerConfig

from nemo_customizer.models.fused import fused_on_cuda


class RMSNorm(torch.nn.Module):
    """Llama RMSNorm, computed in fp32 and cast back (as ``transformers`` does).

    mcore's local spec wraps ``torch.nn.RMSNorm``, which asserts when sequence parallelism is on. Here the weight is
    marked ``sequence_parallel`` so ``finalize_model_grads`` all-reduces its gradient over the tensor-parallel group:
    with SP each rank only sees its slice of the sequence, so each holds a partial gradient.
    """

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-5, **_unused):
        super().__init__()
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype))
        setattr(self.weight, "sequence_parallel", config.sequence_parallel)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return fused_rms_norm(hidden_states, self.weight, eps=self.eps)


def rms_norm(hidden_states: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``transformers``' Llama RMSNorm: normalize in fp32, cast back, then scale in the input dtype."""
    input_dtype = hidden_states.dtype
    hidden = hidden_states.float()
    hidden = hidden * torch.rsqrt(hidden.pow(2).mean(-1, keepdim=True) + eps)
    return weight * hidden.to(input_dtype)


fused_rms_norm = fused_on_cuda(rms_norm)  # eager it is ~6 kernels and fp32 temporaries
