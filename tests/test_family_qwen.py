"""Qwen2/Qwen2.5 and Qwen3 train, export and load like Llama: tiny random checkpoints written with transformers' own
classes (no downloads); logits, packed training, TP=2, one LoRA step, PEFT and merged exports against transformers
(+ peft). Also: config.json's family picks the model (``model=hf``), and an unsupported one fails before any work."""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from _family_checks import (LLAMA_TARGETS, check_generation_matches_transformers, check_logits_match_transformers,
                            check_lora_step_and_adapter_match_peft, check_merged_export_loads_in_transformers,
                            check_tensor_parallel_equals_transformers)
from _tiny import TINY_VOCAB, tiny_arch, write_classification_data, write_tiny_checkpoint

REPO = Path(__file__).resolve().parents[1]

# GQA everywhere (4 heads, 2 key/value heads); Qwen3 with head_dim 24, not hidden/heads = 16.
FAMILIES = {
    "qwen2": dict(architecture="Qwen2ForCausalLM"),
    "qwen3": dict(architecture="Qwen3ForCausalLM", head_dim=24),
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """(family, tied) → (directory, architecture, transformers model) of tiny random checkpoints."""
    root = tmp_path_factory.mktemp("qwen")
    out = {}
    for family in FAMILIES:
        for tied in (False, True):
            arch = tiny_arch(tied=tied, **FAMILIES[family])
            directory = root / f"{family}-{'tied' if tied else 'untied'}"
            out[family, tied] = directory, arch, write_tiny_checkpoint(directory, arch)
    return out


# --- config: the family comes from config.json; an unsupported one is refused before any work ------------------


def test_checkpoint_config_json_reads_as_its_family(checkpoints):
    from nemo_customizer.config import read_hf_config

    for (family, _), (directory, arch, _) in checkpoints.items():
        read = read_hf_config(directory)
        assert read.architectures == arch.architectures and read.model_type == family
        assert read.head_dim == (24 if family == "qwen3" else None)  # Qwen2's config.json has no head_dim


# The official config.json values of the shipped Qwen models (the keys our reader uses).
OFFICIAL = {
    "qwen2.5-7b-instruct": dict(
        architectures=["Qwen2ForCausalLM"], model_type="qwen2", hidden_size=3584, intermediate_size=18944,
        num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4, vocab_size=152064,
        max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-06, tie_word_embeddings=False,
        use_sliding_window=False, sliding_window=131072, hidden_act="silu", bos_token_id=151643,
        eos_token_id=151645),
    "qwen3-0.6b": dict(
        architectures=["Qwen3ForCausalLM"], model_type="qwen3", attention_bias=False, head_dim=128, hidden_size=1024,
        intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8,
        vocab_size=151936, max_position_embeddings=40960, rope_scaling=None, rope_theta=1000000,
        rms_norm_eps=1e-06, tie_word_embeddings=True, use_sliding_window=False, sliding_window=None,
        hidden_act="silu", bos_token_id=151643, eos_token_id=151645),
    "qwen3-8b": dict(
        architectures=["Qwen3ForCausalLM"], model_type="qwen3", attention_bias=False, head_dim=128, hidden_size=4096,
        intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8,
        vocab_size=151936, max_position_embeddings=40960, rope_scaling=None, rope_theta=1000000,
        rms_norm_eps=1e-06, tie_word_embeddings=False, use_sliding_window=False, sliding_window=None,
        hidden_act="silu", bos_token_id=151643, eos_token_id=151645),
}


@pytest.mark.parametrize("name", sorted(OFFICIAL))
def test_shipped_qwen_yaml_matches_its_config_json(name):
    from nemo_customizer.config import architecture_from_hf, compose_config, merge_checkpoint_architecture

    model = compose_config([f"model={name}"]).model
    merge_checkpoint_architecture(model, architecture_from_hf(OFFICIAL[name]))  # raises on any difference


@pytest.mark.parametrize("key, value, words", [
    ("architectures", ["Qwen2MoeForCausalLM"], ["Qwen2MoeForCausalLM", "Qwen3ForCausalLM", "Gemma2ForCausalLM"]),
    ("attention_bias", True, ["attention_bias"]),
    ("hidden_act", "gelu", ["hidden_act"]),
])
def test_unsupported_config_json_is_a_config_error(key, value, words):
    from nemo_customizer.config import ConfigError, architecture_from_hf

    data = dict(OFFICIAL["qwen3-0.6b"], **{key: value})
    if key == "architectures":
        data["model_type"] = "qwen2_moe"  # mixture-of-experts: not built
    with pytest.raises(ConfigError) as error:
        architecture_from_hf(data)
    for word in words:
        assert word in str(error.value)


@pytest.fixture(scope="module")
def unsupported_dir(tmp_path_factory):
    """A checkpoint folder whose config.json names an architecture we do not build, and training data."""
    root = tmp_path_factory.mktemp("unsupported")
    (root / "model").mkdir()
    (root / "model/config.json").write_text(json.dumps(dict(OFFICIAL["qwen3-0.6b"], architectures=["GPTNeoXForCausalLM"],
                                                            model_type="gpt_neox")))
    write_classification_data(root / "data", n_train=8, n_val=2)
    return root


@pytest.mark.parametrize("model", ["hf", "hf-llama"])
def test_unsupported_architecture_exits_2_before_any_work(unsupported_dir, model):
    out = unsupported_dir / f"job-{model}"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    result = subprocess.run([sys.executable, "-m", "nemo_customizer", f"model={model}",
                             f"model.checkpoint={unsupported_dir / 'model'}", f"dataset.path={unsupported_dir / 'data'}",
                             f"output_dir={out}", "device=cpu"], capture_output=True, text=True, cwd=REPO, env=env,
                            timeout=300)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "GPTNeoXForCausalLM" in lines[0], result.stderr
    assert "Qwen2ForCausalLM" in lines[0]  # the supported ones are listed
    assert not out.exists()


def test_unsupported_architecture_is_a_config_error_from_python(unsupported_dir, monkeypatch):
    from nemo_customizer import data
    from nemo_customizer.api import customize
    from nemo_customizer.config import ConfigError

    def no_reading(*args, **kwargs):
        raise AssertionError("the data was read before the architecture was checked")

    monkeypatch.setattr(data, "load_dataset", no_reading)
    out = unsupported_dir / "job-python"
    with pytest.raises(ConfigError, match="GPTNeoXForCausalLM"):
        customize("hf", dataset=str(unsupported_dir / "data"), output_dir=str(out), device="cpu",
                  model={"checkpoint": str(unsupported_dir / "model")})
    assert not out.exists()


# --- numerics against transformers (+ peft), one process ------------------------------------------------------


@pytest.mark.usefixtures("cpu_parallel")
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_logits_match_transformers(checkpoints, family, tied):
    directory, arch, hf = checkpoints[family, tied]
    check_logits_match_transformers(arch, directory, hf)


@pytest.mark.usefixtures("cpu_parallel")
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_lora_step_and_exported_adapter_match_peft(checkpoints, tmp_path, family):
    """Our exported adapter loads in peft with equal logits; one step's loss and every LoRA gradient equal
    transformers+peft's (the q/k/v biases of Qwen2 stay frozen in the base)."""
    directory, arch, _ = checkpoints[family, True]
    check_lora_step_and_adapter_match_peft(arch, directory, LLAMA_TARGETS, tmp_path)


@pytest.mark.usefixtures("cpu_parallel")
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_merged_export_loads_in_transformers(checkpoints, tmp_path, family, tied):
    directory, arch, _ = checkpoints[family, tied]
    check_merged_export_loads_in_transformers(arch, directory, LLAMA_TARGETS, family, tmp_path)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_packed_loss_and_lora_grads_equal_unpacked(checkpoints, cpu_parallel, family):
    from test_packing_numerics import check_packed_equals_unpacked, packed_and_unpacked

    directory, arch, _ = checkpoints[family, False]
    check_packed_equals_unpacked(packed_and_unpacked(str(directory), tp=1, sp=False, layout=cpu_parallel, arch=arch))


# --- TP=2 (+SP) over gloo ------------------------------------------------------------------------------------


def test_tensor_parallel_equals_transformers(checkpoints, tmp_path):
    check_tensor_parallel_equals_transformers({family: checkpoints[family, False] for family in FAMILIES}, tmp_path)


def test_qwen3_chat_template_teaches_hermes_tool_calls():
    from nemo_customizer.inference.tool_calls import detect_tool_syntax, parse_tool_calls

    template = ('{%- if tools %}{{- "# Tools\\n\\nYou are provided with function signatures within <tools></tools> '
                'XML tags:\\n<tools>" }}{%- for tool in tools %}{{- tool | tojson }}{%- endfor %}{{- "\\n</tools>\\n\\n'
                'For each function call, return a json object with function name and arguments within '
                '<tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": '
                '<args-json-object>}\\n</tool_call><|im_end|>\\n" }}{%- endif %}')
    assert detect_tool_syntax(template) == "hermes"
    content, calls = parse_tool_calls('<think>\n</think>\n\n<tool_call>\n{"name": "weather", "arguments": '
                                      '{"city": "Paris"}}\n</tool_call>', "hermes")
    assert [c["function"]["name"] for c in calls] == ["weather"] and content == "<think>\n</think>"


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_kv_cache_generation_matches_transformers(tmp_path, family):
    """generate() with the KV cache (q/k norms and biases on every new token) equals transformers' greedy search."""
    arch = dataclasses.replace(tiny_arch(vocab=TINY_VOCAB, **FAMILIES[family]), bos_token_id=1, eos_token_id=2)
    check_generation_matches_transformers(tmp_path, arch, ["Qwen says hello"])
