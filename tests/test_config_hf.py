"""config.json reading (transformers 4 and 5 layouts), the shipped YAMLs against the official config.json files,
and checkpoint/YAML conflicts."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from nemo_customizer.config import (
    ConfigError,
    architecture_from_hf,
    compose_config,
    merge_checkpoint_architecture,
    read_hf_config,
)
from nemo_customizer.config.schema import RopeScalingConfig

_LLAMA3_EOS = [128001, 128008, 128009]
_LLAMA3 = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "bos_token_id": 128000,
           "eos_token_id": _LLAMA3_EOS, "vocab_size": 128256, "rms_norm_eps": 1e-05, "rope_theta": 500000.0,
           "max_position_embeddings": 131072, "hidden_act": "silu", "torch_dtype": "bfloat16"}


def _llama3_rope(factor: float) -> dict:
    return {"factor": factor, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192, "rope_type": "llama3"}


# The architecture keys of the official Hugging Face config.json files.
OFFICIAL = {
    "smollm2-135m-instruct": {
        "architectures": ["LlamaForCausalLM"], "bos_token_id": 1, "eos_token_id": 2, "hidden_size": 576,
        "intermediate_size": 1536, "max_position_embeddings": 8192, "num_attention_heads": 9,
        "num_hidden_layers": 30, "num_key_value_heads": 3, "rms_norm_eps": 1e-05, "rope_scaling": None,
        "rope_theta": 100000, "tie_word_embeddings": True, "vocab_size": 49152,
    },
    "llama-3.2-1b-instruct": {**_LLAMA3, "head_dim": 64, "hidden_size": 2048, "intermediate_size": 8192,
                              "num_attention_heads": 32, "num_hidden_layers": 16, "num_key_value_heads": 8,
                              "rope_scaling": _llama3_rope(32.0), "tie_word_embeddings": True},
    "llama-3.1-8b-instruct": {**_LLAMA3, "hidden_size": 4096, "intermediate_size": 14336,
                              "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8,
                              "rope_scaling": _llama3_rope(8.0), "tie_word_embeddings": False},
    "llama-3.3-70b-instruct": {**_LLAMA3, "hidden_size": 8192, "intermediate_size": 28672,
                               "num_attention_heads": 64, "num_hidden_layers": 80, "num_key_value_heads": 8,
                               "rope_scaling": _llama3_rope(8.0), "tie_word_embeddings": False},
}


@pytest.mark.parametrize("name", sorted(OFFICIAL))
def test_shipped_yaml_matches_official_config_json(name):
    model = compose_config([f"model={name}"]).model
    merged = merge_checkpoint_architecture(model, architecture_from_hf(OFFICIAL[name]))
    assert merged.architecture.num_hidden_layers == model.architecture.num_hidden_layers


def test_transformers4_layout():
    arch = architecture_from_hf(OFFICIAL["llama-3.2-1b-instruct"])
    assert arch.rope_theta == 500000.0
    assert arch.rope_scaling == RopeScalingConfig(factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                                  original_max_position_embeddings=8192)
    assert arch.eos_token_id == 128001 and arch.eos_token_ids == _LLAMA3_EOS
    assert arch.head_dim == 64 and arch.tie_word_embeddings


def test_transformers5_rope_parameters_layout():
    data = {k: v for k, v in OFFICIAL["llama-3.2-1b-instruct"].items() if k not in ("rope_theta", "rope_scaling")}
    data["rope_parameters"] = {"rope_theta": 500000.0, **_llama3_rope(32.0)}
    assert architecture_from_hf(data) == architecture_from_hf(OFFICIAL["llama-3.2-1b-instruct"])


def test_default_rope_type_means_no_scaling():
    data = dict(OFFICIAL["smollm2-135m-instruct"], rope_parameters={"rope_theta": 100000.0, "rope_type": "default"})
    del data["rope_theta"], data["rope_scaling"]
    arch = architecture_from_hf(data)
    assert arch.rope_scaling is None and arch.rope_theta == 100000.0


def test_optional_keys_take_hf_defaults():
    data = {k: v for k, v in OFFICIAL["llama-3.1-8b-instruct"].items()
            if k not in ("tie_word_embeddings", "num_key_value_heads", "eos_token_id")}
    arch = architecture_from_hf(data)
    assert arch.tie_word_embeddings is False
    assert arch.head_dim is None
    assert arch.num_key_value_heads == arch.num_attention_heads
    assert arch.eos_token_id is None and arch.eos_token_ids is None


def test_unsupported_rope_scaling_and_missing_keys():
    with pytest.raises(ConfigError, match="rope_scaling type 'yarn' is not supported"):
        architecture_from_hf(dict(OFFICIAL["llama-3.1-8b-instruct"], rope_scaling={"type": "yarn", "factor": 4}))
    with pytest.raises(ConfigError, match="lacks hidden_size"):
        architecture_from_hf({k: v for k, v in OFFICIAL["llama-3.1-8b-instruct"].items() if k != "hidden_size"})


def test_read_hf_config_from_directory(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(OFFICIAL["llama-3.1-8b-instruct"]))
    assert read_hf_config(tmp_path) == read_hf_config(tmp_path / "config.json")
    assert read_hf_config(tmp_path).hidden_size == 4096
    with pytest.raises(ConfigError, match="config.json not found"):
        read_hf_config(tmp_path / "nowhere")


def test_float32_round_trip_is_not_a_conflict():
    model = compose_config([]).model
    data = dict(OFFICIAL["smollm2-135m-instruct"], rms_norm_eps=9.999999747378752e-06)  # as GGUF stores it
    merge_checkpoint_architecture(model, architecture_from_hf(data))


def test_conflict_names_key_both_values_and_the_right_model():
    model = compose_config([]).model  # SmolLM2 YAML with a Llama-3.2-1B checkpoint
    with pytest.raises(ConfigError) as info:
        merge_checkpoint_architecture(model, architecture_from_hf(OFFICIAL["llama-3.2-1b-instruct"]),
                                      source="/ckpt/config.json")
    message = str(info.value)
    assert "/ckpt/config.json does not match model 'smollm2-135m-instruct'" in message
    assert "model.architecture.num_hidden_layers is 30 in the model YAML but 16 in the checkpoint" in message
    assert "use model=llama-3.2-1b-instruct" in message


def test_single_conflict_without_a_matching_model():
    model = compose_config(["model=llama-3.1-8b-instruct"]).model
    data = dict(OFFICIAL["llama-3.1-8b-instruct"], vocab_size=128000)
    with pytest.raises(ConfigError) as info:
        merge_checkpoint_architecture(model, architecture_from_hf(data))
    message = str(info.value)
    assert "model.architecture.vocab_size is 128256 in the model YAML but 128000" in message
    assert "add a conf/model/<name>.yaml" in message


def test_merge_takes_the_checkpoint_values():
    model = compose_config(["model=llama-3.1-8b-instruct"]).model
    merged = merge_checkpoint_architecture(model, architecture_from_hf(OFFICIAL["llama-3.1-8b-instruct"]))
    assert merged.architecture.head_dim is None  # as in config.json; 4096 / 32 = 128 equals the YAML's head_dim
    assert merged.max_seq_length == model.max_seq_length


def test_config_package_imports_no_torch():
    code = ("import sys, nemo_customizer.config, nemo_customizer.cli; "
            "bad = [m for m in ('torch', 'megatron') if m in sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)
