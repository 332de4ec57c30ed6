"""Gemma 3 (text, ``Gemma3ForCausalLM``) trains, exports and generates like transformers: a tiny random checkpoint
(no downloads) with interleaved sliding and full-attention layers (window shorter than the test sequences, each
kind with its own RoPE base), head_dim != hidden/heads, query_pre_attn_scalar != head_dim and random (1 + w) norms;
logits padded and packed, one LoRA step against peft, the merged export, TP=2 (+SP), KV-cache generation. Also the
config.json forms and what we refuse."""

import dataclasses

import pytest
import torch

from _family_checks import (check_generation_matches_transformers, check_logits_match_transformers,
                            check_packed_logits_match_transformers,
                            check_lora_step_and_adapter_match_peft, check_merged_export_loads_in_transformers,
                            tensor_parallel_worker, tokens)
from _multiproc import run_world
from _tiny import TINY_VOCAB, load_tiny_model, tiny_arch, write_tiny_checkpoint

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
WINDOW = 8  # shorter than every test sequence (24 to 40 tokens)


def _arch(vocab: int = 256):
    arch = tiny_arch(architecture="Gemma3ForCausalLM", layers=3, head_dim=24, vocab=vocab, tied=True,
                     sliding_window=WINDOW, layer_types=["sliding_attention", "full_attention", "sliding_attention"])
    return dataclasses.replace(arch, model_type="gemma3_text", rope_theta=1e6, rope_local_base_freq=100.0,
                               query_pre_attn_scalar=20, rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """(directory, architecture, transformers model) of a tiny random Gemma 3 text checkpoint."""
    directory = tmp_path_factory.mktemp("gemma3") / "tiny"
    arch = _arch()
    return directory, arch, _write_gemma_checkpoint(directory, arch)


def _write_gemma_checkpoint(directory, arch):
    """``write_tiny_checkpoint`` with its random norm weights moved from around 1 to around 0: Gemma's norms scale
    by ``1 + w``, so their scales span 0.5 to 1.5 as the other families' tiny checkpoints do."""
    hf = write_tiny_checkpoint(directory, arch)
    with torch.no_grad():
        for name, param in hf.named_parameters():
            if "norm" in name:
                param.sub_(1.0)
    hf.save_pretrained(directory)
    return hf


# --- config.json ----------------------------------------------------------------------------------------------

GEMMA_3_1B_IT = dict(  # google/gemma-3-1b-it's config.json (transformers 4 layout)
    architectures=["Gemma3ForCausalLM"], model_type="gemma3_text", attention_bias=False, attn_logit_softcapping=None,
    final_logit_softcapping=None, bos_token_id=2, eos_token_id=[1, 106], pad_token_id=0, head_dim=256,
    hidden_activation="gelu_pytorch_tanh", hidden_size=1152, intermediate_size=6912, max_position_embeddings=32768,
    num_attention_heads=4, num_hidden_layers=26, num_key_value_heads=1, query_pre_attn_scalar=256,
    rms_norm_eps=1e-06, rope_local_base_freq=10000, rope_scaling=None, rope_theta=1000000, sliding_window=512,
    sliding_window_pattern=6, vocab_size=262144)


def test_checkpoint_config_json_reads_as_gemma3(checkpoint):
    from nemo_customizer.config import read_hf_config

    directory, arch, _ = checkpoint
    assert read_hf_config(directory) == arch  # transformers 5's per-layer-type rope_parameters


def test_shipped_yaml_matches_its_config_json():
    from nemo_customizer.config import architecture_from_hf, compose_config, merge_checkpoint_architecture

    arch = architecture_from_hf(GEMMA_3_1B_IT)  # transformers 4's sliding_window_pattern: every 6th layer is full
    assert [i for i, kind in enumerate(arch.layer_types) if kind == "full_attention"] == [5, 11, 17, 23]
    assert (arch.rope_local_base_freq, arch.query_pre_attn_scalar, arch.tie_word_embeddings) == (1e4, 256, True)
    merge_checkpoint_architecture(compose_config(["model=gemma-3-1b-it"]).model, arch)  # raises on any difference


@pytest.mark.parametrize("changes, words", [
    (dict(hidden_activation="gelu"), ["hidden_activation='gelu'"]),
    (dict(rope_scaling={"rope_type": "yarn", "factor": 8.0}), ["'yarn'"]),
    # an image-text config.json nests the text keys (test_family_gemma3_image_text.py reads them)
    (dict(architectures=["Gemma3ForConditionalGeneration"], model_type="gemma3"),
     ["Gemma3ForConditionalGeneration", "text_config"]),
])
def test_unsupported_gemma_config_json_is_a_config_error(changes, words):
    from nemo_customizer.config import ConfigError, architecture_from_hf

    with pytest.raises(ConfigError) as error:
        architecture_from_hf(dict(GEMMA_3_1B_IT, **changes))
    for word in words:
        assert word in str(error.value)


# --- numerics against transformers (+ peft), one process ------------------------------------------------------


@pytest.mark.usefixtures("cpu_parallel")
def test_logits_match_transformers(checkpoint):
    directory, arch, hf = checkpoint
    check_logits_match_transformers(arch, directory, hf)
    ids = tokens(arch, shape=(2, 40))
    for changed in (dict(rope_local_base_freq=None), dict(query_pre_attn_scalar=None)):  # both matter here
        other = load_tiny_model(dataclasses.replace(arch, **changed), directory)
        with torch.no_grad():
            assert (other(ids, torch.arange(40).expand_as(ids), None, runtime_gather_output=True)
                    - hf(ids).logits).abs().max() > 1e-3, changed


@pytest.mark.usefixtures("cpu_parallel")
def test_recomputed_layers_give_the_same_loss_and_grads(checkpoint):
    """Full activation recomputation (the layer inputs, both RoPE tables among them, saved for backward)."""
    from nemo_customizer.models.gpt import build_gpt_model, load_hf_checkpoint, transformer_config

    directory, arch, _ = checkpoint
    ids, labels = tokens(arch, seed=2), tokens(arch, seed=3)
    results = []
    for recompute in (False, True):
        model = build_gpt_model(arch, transformer_config(arch, perform_initialization=False,
                                                         activation_checkpointing=recompute), torch.device("cpu"))
        load_hf_checkpoint(model, arch, str(directory))
        loss = model(ids, torch.arange(ids.shape[1]).expand_as(ids), None, labels=labels,
                     loss_mask=torch.ones(ids.shape)).sum()
        loss.backward()
        results.append((loss.detach(), model.embedding.word_embeddings.weight.grad))
    torch.testing.assert_close(results[0], results[1])


@pytest.mark.usefixtures("cpu_parallel")
def test_packed_logits_match_transformers(checkpoint):
    """Sequences longer and shorter than the window packed into one row: each one's logits equal transformers'."""
    directory, arch, hf = checkpoint
    check_packed_logits_match_transformers(arch, directory, hf)


@pytest.mark.usefixtures("cpu_parallel")
def test_lora_step_and_exported_adapter_match_peft(checkpoint, tmp_path):
    directory, arch, _ = checkpoint
    config = check_lora_step_and_adapter_match_peft(arch, directory, TARGETS, tmp_path)
    assert config["target_modules"] == sorted(TARGETS)


@pytest.mark.usefixtures("cpu_parallel")
def test_merged_export_loads_in_transformers(checkpoint, tmp_path):
    directory, arch, _ = checkpoint
    check_merged_export_loads_in_transformers(arch, directory, TARGETS, "gemma3_text", tmp_path)
    from nemo_customizer.config import read_hf_config

    assert read_hf_config(tmp_path / "merged") == arch


# Gemma's four (1 + w) norms per layer and its per-head q/k norms amplify fp32 rounding: packed and padded LoRA
# gradients differ by a few 1e-6 typically, up to about 2e-5 (the loss agrees to 1e-7). Attention crossing examples
# or a wrong RoPE base differ by orders of magnitude more.
GRAD_RTOL = 5e-5


def test_packed_loss_and_lora_grads_equal_unpacked(checkpoint, cpu_parallel):
    from test_packing_numerics import check_packed_equals_unpacked, packed_and_unpacked

    directory, arch, _ = checkpoint
    out = packed_and_unpacked(str(directory), tp=1, sp=False, layout=cpu_parallel, arch=arch)
    check_packed_equals_unpacked(out, grad_rtol=GRAD_RTOL)


def test_tensor_parallel_equals_transformers(checkpoint, tmp_path):
    """At TP=2 with SP: gathered logits equal transformers', packed loss and LoRA grads equal unpacked ones."""
    from test_packing_numerics import check_packed_equals_unpacked

    directory, arch, hf = checkpoint
    run_world(tensor_parallel_worker, 2, {"gemma3": (str(directory), arch)}, str(tmp_path / "out"))
    with torch.no_grad():
        expected = hf(tokens(arch, shape=(2, 40))).logits
    for rank in range(2):
        results = torch.load(tmp_path / f"out.rank{rank}.pt")["gemma3"]
        assert (results["logits"] - expected).abs().max().item() <= 1e-4
        check_packed_equals_unpacked(results["packing"], grad_rtol=GRAD_RTOL)


def test_kv_cache_generation_matches_transformers(tmp_path):
    """Prompts of 2 to 20 tokens, 16 new ones with a window of 8: alone and batched, as transformers' greedy search."""
    check_generation_matches_transformers(tmp_path, _arch(vocab=TINY_VOCAB),
                                          ["Gemma says hello!", "Hi", "a window of eight"])


# --- chat template: Gemma 2's refuses a system message -----------------------------------------------------------

NO_SYSTEM_TEMPLATE = (  # the system-role check of Gemma 2's template (Gemma 3's folds a system message into the user's)
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for message in messages %}{{ '<start_of_turn>' + message['role'] + '\n' + message['content'] "
    "+ '<end_of_turn>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}")


def test_template_without_system_role_is_a_clear_error(tmp_path):
    from _tiny import write_tiny_tokenizer

    from nemo_customizer.data.chat_masks import ChatEncoder, ChatTemplateError
    from nemo_customizer.inference.chat import ChatTemplate

    tokenizer = write_tiny_tokenizer(tmp_path)
    tokenizer.chat_template = NO_SYSTEM_TEMPLATE
    conversation = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                    {"role": "assistant", "content": "Hello"}]
    with pytest.raises(ChatTemplateError, match="System role not supported"):  # training: the row's error
        ChatEncoder(tokenizer).encode(conversation, None)
    with pytest.raises(ValueError, match="could not render these messages: System role not supported"):  # serving
        ChatTemplate(tokenizer).render(conversation[:2])
    assert ChatTemplate(tokenizer).render(conversation[1:2])  # without the system message it renders
