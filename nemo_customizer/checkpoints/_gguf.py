"""GGUF → Hugging Face folder conversion (private; used by `checkpoints.embedded`).

`transformers` does the heavy lifting: its GGUF loader dequantizes every tensor to fp32, maps the llama.cpp
names (`blk.N.attn_q.weight`) to HF names (`model.layers.N.self_attn.q_proj.weight`) and undoes the q/k row
permutation that llama.cpp's converter applies for its rotary layout. We only make the result serializable
(a GGUF-loaded model refuses `save_pretrained` because it still carries the GGUF `quantization_config`) and
write it as a plain fp32 checkpoint, then check the folder before anyone trusts it.
"""

from __future__ import annotations

import json
import pathlib
from collections.abc import Mapping
from typing import Any

from safetensors import safe_open
from safetensors.torch import save_file


def convert_gguf_to_hf(gguf_path: pathlib.Path, out_dir: pathlib.Path) -> None:
    """Write `gguf_path` (a llama-family GGUF) as an fp32 HF checkpoint + tokenizer into `out_dir`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = model.config

    # Tied embeddings: lm_head.weight is the same tensor as model.embed_tokens.weight; HF checkpoints of
    # tied models store only the embedding (safetensors also refuses shared storage).
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(state, str(out_dir / "model.safetensors"), metadata={"format": "pt"})

    # The weights are now plain fp32, so the GGUF quantization entry must not travel with the config.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.architectures = [type(model).__name__]
    config.dtype = torch.float32
    config.save_pretrained(out_dir)
    GenerationConfig.from_model_config(config).save_pretrained(out_dir)

    # The GGUF tokenizer has no length limit recorded; use the model's context like the HF release does.
    tokenizer.model_max_length = config.max_position_embeddings
    tokenizer.save_pretrained(out_dir)


def llama_tensor_names(num_layers: int, tied: bool) -> set[str]:
    """The standard HF Llama safetensors names for `num_layers` decoder layers."""
    per_layer = (
        "input_layernorm", "post_attention_layernorm",
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj",
    )
    names = {"model.embed_tokens.weight", "model.norm.weight"}
    names |= {f"model.layers.{i}.{p}.weight" for i in range(num_layers) for p in per_layer}
    if not tied:
        names.add("lm_head.weight")
    return names


def verify_hf_folder(
    folder: pathlib.Path,
    expected_config: Mapping[str, Any],
    expected_tokens: Mapping[str, str],
    chat_template_markers: tuple[str, ...] = (),
) -> None:
    """Raise `ValueError` unless `folder` holds the expected config, HF Llama tensor names and tokenizer.

    Reads only JSON and safetensors headers, so it is cheap enough to run after every conversion.
    """
    problems: list[str] = []
    config = json.loads((folder / "config.json").read_text())
    for key, want in expected_config.items():
        if config.get(key) != want:
            problems.append(f"config.json {key}={config.get(key)!r}, expected {want!r}")

    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        names = set(f.keys())
        dtype = f.get_slice("model.embed_tokens.weight").get_dtype() if "model.embed_tokens.weight" in names else None
    want_names = llama_tensor_names(config.get("num_hidden_layers", 0), bool(config.get("tie_word_embeddings")))
    if names != want_names:
        problems.append(
            f"tensor names differ from HF Llama: missing {sorted(want_names - names)[:5]}, "
            f"unexpected {sorted(names - want_names)[:5]}"
        )
    if dtype not in (None, "F32"):
        problems.append(f"embedding dtype {dtype}, expected F32")

    tok_config = json.loads((folder / "tokenizer_config.json").read_text())
    for key, want in expected_tokens.items():
        if tok_config.get(key) != want:
            problems.append(f"tokenizer_config.json {key}={tok_config.get(key)!r}, expected {want!r}")
    template_file = folder / "chat_template.jinja"
    template = template_file.read_text() if template_file.exists() else tok_config.get("chat_template") or ""
    missing_markers = [m for m in chat_template_markers if m not in template]
    if missing_markers:
        problems.append(f"chat template lacks {missing_markers}")
    if problems:
        raise ValueError(f"converted checkpoint in {folder} failed verification:\n  " + "\n  ".join(problems))
