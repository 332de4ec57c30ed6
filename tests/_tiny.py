"""Tiny random Llama checkpoints for numerics tests (written with transformers, read by our loader)."""

from __future__ import annotations

from pathlib import Path

import torch

from nemo_customizer.config.schema import ArchitectureConfig, RopeScalingConfig


def tiny_arch(*, tied: bool = False, rope_scaling: bool = False, heads: int = 4, kv_heads: int = 2,
              layers: int = 2, hidden: int = 64, vocab: int = 256) -> ArchitectureConfig:
    return ArchitectureConfig(
        num_hidden_layers=layers, hidden_size=hidden, num_attention_heads=heads, num_key_value_heads=kv_heads,
        intermediate_size=128, vocab_size=vocab, rope_theta=10000.0,
        rope_scaling=RopeScalingConfig(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                       original_max_position_embeddings=16) if rope_scaling else None,
        rms_norm_eps=1e-5, tie_word_embeddings=tied, max_position_embeddings=256,
    )


def hf_config(arch: ArchitectureConfig):
    from transformers import LlamaConfig

    kwargs = dict(
        vocab_size=arch.vocab_size, hidden_size=arch.hidden_size, intermediate_size=arch.intermediate_size,
        num_hidden_layers=arch.num_hidden_layers, num_attention_heads=arch.num_attention_heads,
        num_key_value_heads=arch.num_key_value_heads, rms_norm_eps=arch.rms_norm_eps,
        tie_word_embeddings=arch.tie_word_embeddings, max_position_embeddings=arch.max_position_embeddings,
        rope_theta=arch.rope_theta, attention_bias=False, mlp_bias=False,
    )
    if arch.rope_scaling is not None:
        s = arch.rope_scaling
        kwargs["rope_scaling"] = dict(rope_type="llama3", factor=s.factor, low_freq_factor=s.low_freq_factor,
                                      high_freq_factor=s.high_freq_factor,
                                      original_max_position_embeddings=s.original_max_position_embeddings)
    return LlamaConfig(**kwargs)


def write_tiny_checkpoint(directory: Path, arch: ArchitectureConfig, seed: int = 0):
    """A random LlamaForCausalLM saved as safetensors; returns the HF model (fp32, eval mode)."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(hf_config(arch)).eval()
    with torch.no_grad():  # HF initializes norms to 1; randomize them so the mapping of norms is tested too
        for name, param in model.named_parameters():
            if "norm" in name:
                param.uniform_(0.5, 1.5)
    model.save_pretrained(directory)
    return model
