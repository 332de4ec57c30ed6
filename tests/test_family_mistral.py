"""Mistral and Ministral with sliding-window attention train, export and generate like transformers: tiny random
checkpoints (no downloads) whose window is shorter than the test sequences; logits padded and packed, packed
training equal to unpadded, TP=2, one LoRA step against peft, the merged export, and greedy generation that runs
past the window. Also the window's config.json forms, per-layer windows, and Mistral's ``[TOOL_CALLS]`` syntax."""

import dataclasses
import json

import pytest
import torch

from _family_checks import (LLAMA_TARGETS, check_generation_matches_transformers, check_logits_match_transformers,
                            check_packed_logits_match_transformers,
                            check_lora_step_and_adapter_match_peft, check_merged_export_loads_in_transformers,
                            check_tensor_parallel_equals_transformers, positions, tokens)
from _tiny import TINY_VOCAB, load_tiny_model, tiny_arch, write_tiny_checkpoint

WINDOW = 8  # shorter than every test sequence (24 to 40 tokens)

# GQA (4 heads, 2 key/value heads) everywhere. Ministral: its own head_dim, a windowed then a full layer.
CASES = {
    "mistral": dict(architecture="MistralForCausalLM", sliding_window=WINDOW),
    "ministral": dict(architecture="MinistralForCausalLM", sliding_window=WINDOW, head_dim=24,
                      layer_types=["sliding_attention", "full_attention"]),
    "qwen2-windowed": dict(architecture="Qwen2ForCausalLM", sliding_window=WINDOW,
                           layer_types=["full_attention", "sliding_attention"]),
}
MODEL_TYPES = {"mistral": "mistral", "ministral": "ministral", "qwen2-windowed": "qwen2"}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """case → (directory, architecture, transformers model) of tiny random checkpoints."""
    root = tmp_path_factory.mktemp("mistral")
    out = {}
    for case, options in CASES.items():
        arch = tiny_arch(**options)
        out[case] = root / case, arch, write_tiny_checkpoint(root / case, arch)
    return out


# --- config.json: the window and the layers that use it -------------------------------------------------------


def test_checkpoint_config_json_reads_with_its_window(checkpoints):
    from nemo_customizer.config import read_hf_config

    for case, (directory, arch, _) in checkpoints.items():
        read = read_hf_config(directory)
        assert (read.sliding_window, read.layer_types) == (WINDOW, arch.layer_types), case
        assert read.model_type == MODEL_TYPES[case]


MISTRAL_V03 = dict(  # the keys of mistralai/Mistral-7B-Instruct-v0.3's config.json
    architectures=["MistralForCausalLM"], model_type="mistral", hidden_size=4096, intermediate_size=14336,
    num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=32768,
    max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-05, sliding_window=None,
    tie_word_embeddings=False, hidden_act="silu", bos_token_id=1, eos_token_id=2)
MINISTRAL_8B = dict(  # mistralai/Ministral-8B-Instruct-2410's (the window is the context: it never bites there)
    architectures=["MistralForCausalLM"], model_type="mistral", hidden_size=4096, intermediate_size=12288,
    num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=131072,
    max_position_embeddings=32768, rope_theta=100000000.0, rms_norm_eps=1e-05, sliding_window=32768,
    tie_word_embeddings=False, hidden_act="silu", bos_token_id=1, eos_token_id=2)


@pytest.mark.parametrize("name, data", [("mistral-7b-instruct-v0.3", MISTRAL_V03),
                                        ("ministral-8b-instruct-2410", MINISTRAL_8B)])
def test_shipped_mistral_yaml_matches_its_config_json(name, data):
    from nemo_customizer.config import architecture_from_hf, compose_config, merge_checkpoint_architecture

    model = compose_config([f"model={name}"]).model
    merge_checkpoint_architecture(model, architecture_from_hf(data))  # raises on any difference


@pytest.mark.parametrize("changes, window, layer_types", [
    ({"sliding_window": 4096}, 4096, None),  # Mistral-7B v0.1
    ({"sliding_window": "absent"}, 4096, None),  # transformers' MistralConfig default
    ({"layer_types": ["full_attention"] * 32, "sliding_window": 4096}, None, None),
    ({"layer_types": ["sliding_attention", "full_attention"] * 16, "sliding_window": 4096}, 4096,
     ["sliding_attention", "full_attention"] * 16),
    ({"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "sliding_window": 4096,
      "use_sliding_window": False}, None, None),
    ({"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "sliding_window": 4096,
      "use_sliding_window": True, "max_window_layers": 30}, 4096, ["full_attention"] * 30 + ["sliding_attention"] * 2),
    ({"architectures": ["LlamaForCausalLM"], "model_type": "llama", "sliding_window": 4096}, None, None),
])
def test_window_from_config_json(changes, window, layer_types):
    from nemo_customizer.config import architecture_from_hf

    data = dict(MISTRAL_V03, **changes)
    if data["sliding_window"] == "absent":
        del data["sliding_window"]
    arch = architecture_from_hf(data)
    assert (arch.sliding_window, arch.layer_types) == (window, layer_types)


def test_bad_layer_types_are_config_errors():
    from nemo_customizer.config import ConfigError, architecture_from_hf
    from nemo_customizer.config.validate import validate_architecture

    with pytest.raises(ConfigError, match="layer_types"):
        architecture_from_hf(dict(MISTRAL_V03, sliding_window=4096, layer_types=["sliding_attention"]))
    with pytest.raises(ConfigError, match="sliding_window is null"):
        validate_architecture(tiny_arch(layer_types=["full_attention", "sliding_attention"]))


# --- attention: the window restarts with each packed sequence -------------------------------------------------


def test_packed_windowed_attention_equals_masked_reference():
    """CoreAttention on a packed batch (CPU path: SDPA per sequence, the window's mask only where a sequence is
    longer than it) equals one SDPA with the block-diagonal windowed mask; padding after the last sequence too."""
    from megatron.core.packed_seq_params import PackedSeqParams
    from megatron.core.transformer.enums import AttnMaskType

    from nemo_customizer.models.attention import CoreAttention, packed_causal_mask
    from nemo_customizer.models.gpt import transformer_config

    attention = CoreAttention(transformer_config(tiny_arch(sliding_window=WINDOW)), 1, AttnMaskType.causal, "self")
    assert attention.window == WINDOW
    lengths, total = [20, 3, 0, 13], 40
    cu = torch.tensor([0] + lengths).cumsum(0)
    params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=20, max_seqlen_kv=20)
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(total, h, 16, generator=gen) for h in (4, 2, 2))
    out = attention(q, k, v, None, packed_seq_params=params)
    mask = packed_causal_mask(cu, total, window=WINDOW)
    expected = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), attn_mask=mask, enable_gqa=True)
    torch.testing.assert_close(out, expected.transpose(0, 1).reshape(total, -1), rtol=1e-5, atol=1e-5)
    windowless = packed_causal_mask(cu, total)
    assert not torch.equal(mask, windowless) and torch.equal(mask[20:23], windowless[20:23])  # a short one unmasked


# --- numerics against transformers (+ peft), one process ------------------------------------------------------


@pytest.mark.usefixtures("cpu_parallel")
@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_match_transformers(checkpoints, case):
    directory, arch, hf = checkpoints[case]
    check_logits_match_transformers(arch, directory, hf)
    without_window = load_tiny_model(dataclasses.replace(arch, sliding_window=None, layer_types=None), directory)
    ids = tokens(arch, shape=(2, 40))
    with torch.no_grad():  # the window matters at this length: a model without it differs
        assert (without_window(ids, positions(ids), None, runtime_gather_output=True) - hf(ids).logits).abs().max() > 1e-2


@pytest.mark.usefixtures("cpu_parallel")
@pytest.mark.parametrize("case", sorted(CASES))
def test_packed_logits_match_transformers(checkpoints, case):
    """Sequences longer and shorter than the window packed into one row: each one's logits equal transformers'
    on it alone (the window restarts at every sequence)."""
    directory, arch, hf = checkpoints[case]
    check_packed_logits_match_transformers(arch, directory, hf)


@pytest.mark.usefixtures("cpu_parallel")
@pytest.mark.parametrize("case", ["mistral", "ministral"])
def test_lora_step_and_exported_adapter_match_peft(checkpoints, tmp_path, case):
    directory, arch, _ = checkpoints[case]
    check_lora_step_and_adapter_match_peft(arch, directory, LLAMA_TARGETS, tmp_path, length=32)


@pytest.mark.usefixtures("cpu_parallel")
@pytest.mark.parametrize("case", sorted(CASES))
def test_merged_export_loads_in_transformers(checkpoints, tmp_path, case):
    """The exported config.json carries the window and layer types (and Mistral's explicit null: its config class
    would assume 4096)."""
    directory, arch, _ = checkpoints[case]
    check_merged_export_loads_in_transformers(arch, directory, LLAMA_TARGETS, MODEL_TYPES[case], tmp_path, length=32)
    config = json.loads((tmp_path / "merged/config.json").read_text())
    assert config["sliding_window"] == WINDOW


def test_export_without_window_writes_null():
    from nemo_customizer.checkpoints.hf_export import hf_config_dict

    config = hf_config_dict(tiny_arch(architecture="MistralForCausalLM"))
    assert "sliding_window" in config and config["sliding_window"] is None


@pytest.mark.parametrize("case", sorted(CASES))
def test_packed_loss_and_lora_grads_equal_unpacked(checkpoints, cpu_parallel, case):
    from test_packing_numerics import check_packed_equals_unpacked, packed_and_unpacked

    directory, arch, _ = checkpoints[case]
    check_packed_equals_unpacked(packed_and_unpacked(str(directory), tp=1, sp=False, layout=cpu_parallel, arch=arch))


def test_tensor_parallel_equals_transformers(checkpoints, tmp_path):
    """At TP=2 with SP, windowed: gathered logits equal transformers', packed loss and LoRA grads unpacked ones."""
    check_tensor_parallel_equals_transformers({case: checkpoints[case] for case in ("mistral", "ministral")}, tmp_path)


# --- generation past the window -------------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["mistral", "ministral"])
def test_kv_cache_generation_past_the_window_matches_transformers(tmp_path, case):
    """Prompts of 3 to 20 tokens, 16 new ones with a window of 8: decoding drops the keys that left the window,
    alone and in a batch whose rows sit at different cache offsets."""
    arch = dataclasses.replace(tiny_arch(vocab=TINY_VOCAB, **CASES[case]), bos_token_id=1, eos_token_id=2)
    check_generation_matches_transformers(tmp_path, arch, ["Mistral says hello!", "Hi", "a window of eight"])


# --- tool calls -----------------------------------------------------------------------------------------------


MISTRAL_TOOLS_TEMPLATE = (
    '{%- for message in messages %}{%- if message.role == "user" %}{%- if tools and loop.last %}'
    '{{- "[AVAILABLE_TOOLS] [" }}{%- for tool in tools %}{{- tool | tojson }}{%- endfor %}{{- "][/AVAILABLE_TOOLS]" }}'
    '{%- endif %}{{- "[INST] " + message.content + "[/INST]" }}{%- elif message.tool_calls is defined %}'
    '{{- "[TOOL_CALLS] [" }}{%- for call in message.tool_calls %}{{- call.function | tojson }}{%- endfor %}'
    '{{- "]" + eos_token }}{%- endif %}{%- endfor %}')


def test_mistral_chat_template_teaches_tool_calls():
    from nemo_customizer.inference.tool_calls import detect_tool_syntax, parse_tool_calls

    assert detect_tool_syntax(MISTRAL_TOOLS_TEMPLATE) == "mistral"
    calls_text = '[{"name": "weather", "arguments": {"city": "Paris"}}, {"name": "time", "arguments": {}}]'
    for text in ("[TOOL_CALLS] " + calls_text, calls_text, " " + calls_text):  # tag kept, or skipped when decoding
        content, calls = parse_tool_calls(text, "mistral")
        assert content is None and [c["function"]["name"] for c in calls] == ["weather", "time"]
        assert json.loads(calls[0]["function"]["arguments"]) == {"city": "Paris"}
    content, calls = parse_tool_calls('Let me check.\n' + calls_text, "mistral")
    assert content == "Let me check." and len(calls) == 2
    for plain in ("The answer is [1, 2].", "[TOOL_CALLS] [not json", '[{"no_name": 1}]', ""):
        assert parse_tool_calls(plain, "mistral") == (plain, [])
