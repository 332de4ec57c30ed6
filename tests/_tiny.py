"""Tiny random checkpoints of any supported family for numerics tests (written with transformers' own config and
model classes, read by our loader)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from nemo_customizer.config.schema import ArchitectureConfig, RopeScalingConfig


def tiny_arch(*, tied: bool = False, rope_scaling: bool = False, heads: int = 4, kv_heads: int = 2,
              layers: int = 2, hidden: int = 64, vocab: int = 256, architecture: str = "LlamaForCausalLM",
              head_dim: int | None = None, sliding_window: int | None = None,
              layer_types: list[str] | None = None) -> ArchitectureConfig:
    return ArchitectureConfig(sliding_window=sliding_window, layer_types=layer_types,
        architectures=[architecture], head_dim=head_dim, num_hidden_layers=layers, hidden_size=hidden, num_attention_heads=heads, num_key_value_heads=kv_heads,
        intermediate_size=128, vocab_size=vocab, rope_theta=10000.0,
        rope_scaling=RopeScalingConfig(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                       original_max_position_embeddings=16) if rope_scaling else None,
        rms_norm_eps=1e-5, tie_word_embeddings=tied, max_position_embeddings=256,
    )


def hf_config(arch: ArchitectureConfig):
    """transformers' config class of the architecture's family (LlamaConfig, Qwen2Config, Qwen3Config,
    Phi3Config, ...)."""
    from transformers import AutoConfig

    from nemo_customizer.config.families import family_of

    family = family_of(arch.architectures, arch.model_type)
    kwargs = dict(
        vocab_size=arch.vocab_size, hidden_size=arch.hidden_size, intermediate_size=arch.intermediate_size,
        num_hidden_layers=arch.num_hidden_layers, num_attention_heads=arch.num_attention_heads,
        num_key_value_heads=arch.num_key_value_heads, rms_norm_eps=arch.rms_norm_eps,
        tie_word_embeddings=arch.tie_word_embeddings, max_position_embeddings=arch.max_position_embeddings,
        rope_theta=arch.rope_theta, architectures=list(arch.architectures),
        pad_token_id=None,  # Phi3Config's default (32000) is outside a tiny vocabulary
    )
    if arch.head_dim is not None:
        kwargs["head_dim"] = arch.head_dim
    for key in ("bos_token_id", "eos_token_id"):  # else the config class's defaults (Llama: 1 and 2; Qwen: none)
        if getattr(arch, key) is not None:
            kwargs[key] = getattr(arch, key)
    if not family.qkv_bias:
        kwargs.update(attention_bias=False, mlp_bias=False)
    if family.sliding_window or arch.sliding_window is not None:  # Mistral's class assumes 4096 where not given
        kwargs["sliding_window"] = arch.sliding_window
    if arch.sliding_window is not None and (arch.layer_types is not None or not family.sliding_window):
        # Qwen2's class windows only under use_sliding_window, and derives layer types from max_window_layers
        kwargs.update(use_sliding_window=True,
                      layer_types=list(arch.layer_types or ["sliding_attention"] * arch.num_hidden_layers))
    for key in ("query_pre_attn_scalar", "rope_local_base_freq"):  # Gemma 3
        if getattr(arch, key) is not None:
            kwargs[key] = getattr(arch, key)
    if family.module in ("gemma2", "gemma3"):
        # Gemma2Config caps logits unless told null; both derive their own layer types where none are given
        kwargs.update(attn_logit_softcapping=arch.attn_logit_softcapping,
                      final_logit_softcapping=arch.final_logit_softcapping,
                      layer_types=list(arch.layer_types or [
                          "full_attention" if arch.sliding_window is None else "sliding_attention"]
                          * arch.num_hidden_layers))
    if arch.rope_scaling is not None and arch.rope_scaling.rope_type == "longrope":  # Phi-3
        s = arch.rope_scaling
        kwargs["rope_scaling"] = dict(rope_type="longrope", short_factor=s.short_factor, long_factor=s.long_factor)
        kwargs["original_max_position_embeddings"] = s.original_max_position_embeddings  # Phi3Config's own key
    elif arch.rope_scaling is not None:
        s = arch.rope_scaling
        kwargs["rope_scaling"] = dict(rope_type="llama3", factor=s.factor, low_freq_factor=s.low_freq_factor,
                                      high_freq_factor=s.high_freq_factor,
                                      original_max_position_embeddings=s.original_max_position_embeddings)
    return AutoConfig.for_model(arch.model_type or family.model_type, **kwargs)


def write_tiny_checkpoint(directory: Path, arch: ArchitectureConfig, seed: int = 0):
    """A random model of the architecture's family saved as safetensors; returns the HF model (fp32, eval mode)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(hf_config(arch)).eval()
    with torch.no_grad():  # HF initializes norms to 1 and biases to 0; randomize them so their mapping is tested too
        for name, param in model.named_parameters():
            if "norm" in name:
                param.uniform_(0.5, 1.5)
            elif name.endswith(".bias"):
                param.normal_(0, 0.5)
    model.save_pretrained(directory)
    return model


TINY_VOCAB = 320  # 256 byte tokens + specials, padded to a multiple of 64


def write_tiny_tokenizer(directory: Path):
    """A byte-level tokenizer (no merges) with <s>/</s>/<pad>: encodes any text, needs no download."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2}
    for char in sorted(alphabet):
        vocab[char] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>",
                                        pad_token="<pad>")
    tokenizer.save_pretrained(directory)
    return tokenizer


def write_tiny_model_dir(directory: Path, arch: ArchitectureConfig | None = None, seed: int = 0):
    """An HF checkpoint directory (random tiny Llama + byte tokenizer) like a user's fine-tuning base."""
    arch = arch or dataclasses.replace(tiny_arch(vocab=TINY_VOCAB), max_position_embeddings=2048, head_dim=16,
                                       bos_token_id=1, eos_token_id=2)
    hf = write_tiny_checkpoint(directory, arch, seed)
    write_tiny_tokenizer(directory)
    return hf


def write_classification_data(directory: Path, n_train: int = 64, n_val: int = 16, seed: int = 0) -> Path:
    """A learnable prompt/completion task: the label is the first word of the prompt, repeated."""
    import json
    import random

    rng = random.Random(seed)
    directory.mkdir(parents=True, exist_ok=True)
    for name, n in (("training.jsonl", n_train), ("validation.jsonl", n_val)):
        with open(directory / name, "w") as handle:
            for _ in range(n):
                label = rng.choice(["yes", "no"])
                filler = " ".join(rng.choice(["a", "b", "c", "d"]) for _ in range(rng.randint(2, 12)))
                handle.write(json.dumps({"prompt": f"{label} {filler}\nAnswer: ", "completion": label}) + "\n")
    return directory


def load_tiny_model(arch: ArchitectureConfig, directory: Path):
    """Our Megatron model (this process's TP shard, CPU, fp32) with the HF checkpoint in ``directory`` loaded."""
    from nemo_customizer.models.gpt import build_gpt_model, load_hf_checkpoint, transformer_config

    model = build_gpt_model(arch, transformer_config(arch, perform_initialization=False), torch.device("cpu"))
    load_hf_checkpoint(model, arch, str(directory))
    return model


def tiny_generator_config(directory: Path, arch: ArchitectureConfig, device: str = "cpu"):
    """An fp32 inference config on ``device`` for the tiny checkpoint in ``directory``."""
    from nemo_customizer.config.schema import Config, ModelConfig

    return Config(model=ModelConfig(checkpoint=str(directory), architecture=arch), device=device, precision="fp32")


def write_random_peft_adapter(model_dir: Path, adapter_dir: Path, target_modules, *, r: int = 4, alpha: int = 8,
                              seed: int = 3):
    """A peft LoRA adapter with random A and B (B is zero when peft creates it: give the adapter an effect) for the
    HF checkpoint in ``model_dir``, saved to ``adapter_dir``; returns the peft model (fp32, eval mode)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(str(model_dir)),
                           LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=list(target_modules)))
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.normal_(0, 0.3)
    model.save_pretrained(str(adapter_dir))
    return model.eval()


def train_losses(job_dir: Path) -> list[float]:
    """The per-step train losses in a job's ``metrics.jsonl``."""
    rows = [json.loads(line) for line in (job_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if r["event"] == "train"]
