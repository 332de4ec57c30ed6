"""RMSNorm for our layer spec: HF-exact numerics and usable under sequence parallelism."""

from __future__ import annotations

import torch
from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.transformer.transformer_config import TransformerConfig

from nemo_customizer.models.fused import fused_on_cuda


class RMSNorm(torch.nn.Module):
    """Llama RMSNorm, computed in fp32 and cast back (as ``transformers`` does).

    mcore's local spec wraps ``torch.nn.RMSNorm``, which asserts when sequence parallelism is on. Here the weight is
    marked ``sequence_parallel`` so ``finalize_model_grads`` all-reduces its gradient over the tensor-parallel group:
    with SP each rank only sees its slice of the sequence, so each holds a partial gradient.

    With mcore's ``layernorm_zero_centered_gamma`` (Gemma) the scale is ``1 + weight``, all in fp32 before the cast
    back, as ``transformers``' Gemma RMSNorm computes it; the weight then starts at zero.
    """

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-5, **_unused):
        super().__init__()
        self.eps = eps
        self.zero_centered = config.layernorm_zero_centered_gamma
        initial = torch.zeros if self.zero_centered else torch.ones
        self.weight = torch.nn.Parameter(initial(hidden_size, dtype=config.params_dtype))
        setattr(self.weight, "sequence_parallel", config.sequence_parallel)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self.zero_centered:
            return fused_zero_centered_rms_norm(hidden_states, self.weight, eps=self.eps)
        return fused_rms_norm(hidden_states, self.weight, eps=self.eps)


def rms_norm(hidden_states: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``transformers``' Llama RMSNorm: normalize in fp32, cast back, then scale in the input dtype."""
    input_dtype = hidden_states.dtype
    hidden = hidden_states.float()
    hidden = hidden * torch.rsqrt(hidden.pow(2).mean(-1, keepdim=True) + eps)
    return weight * hidden.to(input_dtype)


fused_rms_norm = fused_on_cuda(rms_norm)  # eager it is ~6 kernels and fp32 temporaries


def zero_centered_rms_norm(hidden_states: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``transformers``' Gemma RMSNorm: normalize and scale by ``1 + weight`` in fp32, then cast back."""
    hidden = hidden_states.float()
    hidden = hidden * torch.rsqrt(hidden.pow(2).mean(-1, keepdim=True) + eps)
    return (hidden * (1.0 + weight.float())).to(hidden_states.dtype)


fused_zero_centered_rms_norm = fused_on_cuda(zero_centered_rms_norm)


class NormThenAdd(torch.nn.Module):
    """The residual add of a layer whose branch output is normalized first (Gemma's post-attention and
    post-feedforward norms): ``residual + norm(branch)``.

    It sits where mcore's layer spec puts the bias-dropout-add (``self_attn_bda`` / ``mlp_bda``), which the layer
    calls as ``bda(training, fused)((output, bias), residual, dropout)``: after the whole branch, so a LoRA adapter of
    ``o_proj`` or ``down_proj`` adds into the output before the norm, as in ``transformers``+``peft``.
    """

    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.norm = RMSNorm(config, config.hidden_size, eps=config.layernorm_epsilon)

    def forward(self, training: bool, fused: bool):
        add = get_bias_dropout_add(training, fused)

        def norm_then_add(output_with_bias, residual: torch.Tensor, dropout: float) -> torch.Tensor:
            output, bias = output_with_bias
            if bias is not None:
                raise ValueError("a normalized residual branch takes no output bias")
            return add((self.norm(output), None), residual, dropout)

        return norm_then_add
