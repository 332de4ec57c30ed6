"""Gemma 2 (``Gemma2ForCausalLM``) trains, exports and generates like transformers: a tiny random checkpoint (no
downloads) with sliding and full-attention layers alternating (a window shorter than the test sequences), GQA,
head_dim != hidden/heads, query_pre_attn_scalar != head_dim, random (1 + w) norms, and both softcaps small enough to
bite (attention scores capped at 5, logits at 3; its q/k and embedding weights are scaled up so that scores and logits
reach past the caps); logits padded and packed, one LoRA step against peft, the exported adapter and merged model,
TP=2 (+SP), generation and scoring. Also the config.json forms and what we refuse."""

import dataclasses
import json

import pytest
import torch

from _family_checks import (LLAMA_TARGETS, check_generation_matches_transformers, check_logits_match_transformers,
                            check_packed_logits_match_transformers,
                            check_lora_step_and_adapter_match_peft, check_merged_export_loads_in_transformers,
                            positions, tensor_parallel_worker, tokens)
from _multiproc import run_world
from _tiny import TINY_VOCAB, load_tiny_model, tiny_arch, tiny_generator_config, write_tiny_checkpoint, \
    write_tiny_tokenizer

WINDOW = 8  # shorter than every test sequence (24 to 40 tokens)
ATTENTION_CAP, LOGIT_CAP = 5.0, 3.0


def _arch(vocab: int = TINY_VOCAB):
    arch = tiny_arch(architecture="Gemma2ForCausalLM", layers=3, head_dim=24, vocab=vocab, tied=True,
                     sliding_window=WINDOW, layer_types=["sliding_attention", "full_attention", "sliding_attention"])
    return dataclasses.replace(arch, model_type="gemma2", query_pre_attn_scalar=20, rms_norm_eps=1e-6,
                               attn_logit_softcapping=ATTENTION_CAP, final_logit_softcapping=LOGIT_CAP,
                               bos_token_id=1, eos_token_id=2)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """(directory, architecture, transformers model) of a tiny random Gemma 2 checkpoint with a byte tokenizer."""
    directory = tmp_path_factory.mktemp("gemma2") / "tiny"
    arch = _arch()
    hf = write_tiny_checkpoint(directory, arch)
    with torch.no_grad():
        for name, param in hf.named_parameters():
            if "norm" in name:  # Gemma's norms scale by 1 + w: scales from 0.5 to 1.5, as the other families'
                param.sub_(1.0)
            elif "q_proj" in name or "k_proj" in name:  # attention scores past the cap
                param.mul_(3.0)
            elif "embed_tokens" in name:  # the (tied) output layer's logits past the cap
                param.mul_(10.0)
    hf.save_pretrained(directory)
    write_tiny_tokenizer(directory)
    return directory, arch, hf


# --- config.json ----------------------------------------------------------------------------------------------

GEMMA_2_2B_IT = dict(  # google/gemma-2-2b-it's config.json (transformers 4 layout)
    architectures=["Gemma2ForCausalLM"], model_type="gemma2", attention_bias=False, attention_dropout=0.0,
    attn_logit_softcapping=50.0, bos_token_id=2, cache_implementation="hybrid", eos_token_id=[1, 107],
    final_logit_softcapping=30.0, head_dim=256, hidden_act="gelu_pytorch_tanh", hidden_activation="gelu_pytorch_tanh",
    hidden_size=2304, initializer_range=0.02, intermediate_size=9216, max_position_embeddings=8192,
    num_attention_heads=8, num_hidden_layers=26, num_key_value_heads=4, pad_token_id=0, query_pre_attn_scalar=256,
    rms_norm_eps=1e-06, rope_theta=10000.0, sliding_window=4096, torch_dtype="float32", vocab_size=256000)


def test_checkpoint_config_json_reads_as_gemma2(checkpoint):
    from nemo_customizer.config import read_hf_config

    directory, arch, _ = checkpoint
    assert read_hf_config(directory) == arch  # transformers 5's layout: rope_parameters, explicit layer_types


def test_shipped_yaml_matches_its_config_json():
    from nemo_customizer.config import architecture_from_hf, compose_config, merge_checkpoint_architecture

    arch = architecture_from_hf(GEMMA_2_2B_IT)  # no layer_types: Gemma2Config's, windowed on even layers
    assert [i for i, kind in enumerate(arch.layer_types) if kind == "sliding_attention"] == list(range(0, 26, 2))
    assert (arch.attn_logit_softcapping, arch.final_logit_softcapping, arch.sliding_window) == (50.0, 30.0, 4096)
    assert (arch.query_pre_attn_scalar, arch.tie_word_embeddings, arch.eos_token_ids) == (256, True, [1, 107])
    merge_checkpoint_architecture(compose_config(["model=gemma-2-2b-it"]).model, arch)  # raises on any difference


def test_softcapping_keys_null_or_absent():
    """null: no cap; absent: Gemma2Config's defaults (50, 30) for Gemma 2, none for Gemma 3, which reads a cap its
    config.json sets as Gemma 2 does."""
    from nemo_customizer.config import architecture_from_hf

    caps = ("attn_logit_softcapping", "final_logit_softcapping")
    nulls = architecture_from_hf(dict(GEMMA_2_2B_IT, attn_logit_softcapping=None, final_logit_softcapping=None))
    assert (nulls.attn_logit_softcapping, nulls.final_logit_softcapping) == (None, None)
    without = {key: value for key, value in GEMMA_2_2B_IT.items() if key not in caps}
    absent = architecture_from_hf(without)
    assert (absent.attn_logit_softcapping, absent.final_logit_softcapping) == (50.0, 30.0)
    gemma3 = dict(without, architectures=["Gemma3ForCausalLM"], model_type="gemma3_text")
    absent = architecture_from_hf(gemma3)
    assert (absent.attn_logit_softcapping, absent.final_logit_softcapping) == (None, None)
    assert architecture_from_hf(dict(gemma3, final_logit_softcapping=30.0)).final_logit_softcapping == 30.0


@pytest.mark.parametrize("changes, words", [
    (dict(attn_logit_softcapping=0.0), ["attn_logit_softcapping=0.0"]),
    (dict(final_logit_softcapping=-30.0), ["final_logit_softcapping=-30.0"]),
    (dict(hidden_activation="gelu"), ["hidden_activation='gelu'"]),
    (dict(use_bidirectional_attention=True), ["use_bidirectional_attention"]),
    (dict(rope_scaling={"rope_type": "yarn", "factor": 8.0}), ["'yarn'"]),
])
def test_unsupported_gemma2_config_json_is_a_config_error(changes, words):
    from nemo_customizer.config import ConfigError, architecture_from_hf

    with pytest.raises(ConfigError) as error:
        architecture_from_hf(dict(GEMMA_2_2B_IT, **changes))
    for word in words:
        assert word in str(error.value)


def test_cuda_graphs_and_required_flash_attn4_refuse_softcapped_attention():
    from nemo_customizer.config import ConfigError
    from nemo_customizer.config.schema import HyperparametersConfig, ModelConfig
    from nemo_customizer.config.validate import check_softcapped_attention

    capped, uncapped = ModelConfig(architecture=_arch()), ModelConfig(
        architecture=dataclasses.replace(_arch(), attn_logit_softcapping=None))
    graphs = HyperparametersConfig(cuda_graphs=True, sequence_packing_enabled=True)
    with pytest.raises(ConfigError, match="cuda_graphs=false"):
        check_softcapped_attention(capped, graphs)
    with pytest.raises(ConfigError, match="attention_kernel=auto"):
        check_softcapped_attention(dataclasses.replace(capped, attention_kernel="fa4"), HyperparametersConfig())
    for model, hp in ((uncapped, graphs), (dataclasses.replace(uncapped, attention_kernel="fa4"), graphs),
                      (capped, HyperparametersConfig())):
        check_softcapped_attention(model, hp)


# --- numerics against transformers (+ peft), one process ------------------------------------------------------


@pytest.mark.usefixtures("cpu_parallel")
def test_logits_match_transformers(checkpoint):
    directory, arch, hf = checkpoint
    check_logits_match_transformers(arch, directory, hf)
    ids = tokens(arch, shape=(2, 40))
    with torch.no_grad():
        expected = hf(ids).logits
        assert expected.abs().max() > 0.9 * LOGIT_CAP  # the logits reach the cap
        for changed in (dict(attn_logit_softcapping=None), dict(final_logit_softcapping=None),
                        dict(query_pre_attn_scalar=None)):  # each one matters here
            other = load_tiny_model(dataclasses.replace(arch, **changed), directory).eval()
            assert (other(ids, positions(ids), None, runtime_gather_output=True) - expected).abs().max() > 1e-2, \
                changed


@pytest.mark.usefixtures("cpu_parallel")
def test_packed_logits_match_transformers(checkpoint):
    """Sequences longer and shorter than the window packed into one row: each one's logits equal transformers'."""
    directory, arch, hf = checkpoint
    check_packed_logits_match_transformers(arch, directory, hf)


@pytest.mark.usefixtures("cpu_parallel")
def test_loss_is_the_cross_entropy_of_capped_logits(checkpoint, monkeypatch):
    """The loss head caps the logits before the cross-entropy (with and without gradients: training, validation),
    whatever its chunking."""
    from nemo_customizer.models import loss

    directory, arch, hf = checkpoint
    model = load_tiny_model(arch, directory)
    ids, labels = tokens(arch, seed=2), tokens(arch, seed=3)
    with torch.no_grad():
        expected = torch.nn.functional.cross_entropy(hf(ids).logits.flatten(0, 1), labels.flatten(), reduction="none")
    mask = torch.ones(ids.shape)
    for chunk in (loss.LOSS_CHUNK_TOKENS, 7):
        monkeypatch.setattr(loss, "LOSS_CHUNK_TOKENS", chunk)
        trained = model(ids, positions(ids), None, labels=labels, loss_mask=mask)
        with torch.no_grad():
            validated = model(ids, positions(ids), None, labels=labels, loss_mask=mask)
        for losses in (trained, validated):  # ours are (s, b)-ordered: rows of the flattened transpose
            torch.testing.assert_close(losses.detach(), expected.view(2, -1).t().flatten())


@pytest.mark.usefixtures("cpu_parallel")
def test_lora_step_and_exported_adapter_match_peft(checkpoint, tmp_path):
    directory, arch, _ = checkpoint
    config = check_lora_step_and_adapter_match_peft(arch, directory, LLAMA_TARGETS, tmp_path)
    assert config["target_modules"] == sorted(LLAMA_TARGETS)


@pytest.mark.usefixtures("cpu_parallel")
def test_merged_export_loads_in_transformers(checkpoint, tmp_path):
    """config.json written from the architecture alone: both caps, every layer's type, the window."""
    from nemo_customizer.config import read_hf_config

    directory, arch, _ = checkpoint
    check_merged_export_loads_in_transformers(arch, directory, LLAMA_TARGETS, "gemma2", tmp_path)
    assert read_hf_config(tmp_path / "merged") == arch


def test_export_without_window_or_caps_loads_as_such(tmp_path):
    """No window: every layer attends fully (Gemma2Config would alternate); null caps stay null (it would cap)."""
    from transformers import AutoConfig

    from nemo_customizer.checkpoints.hf_export import hf_config_dict

    arch = dataclasses.replace(_arch(), sliding_window=None, layer_types=None, attn_logit_softcapping=None,
                               final_logit_softcapping=None)
    (tmp_path / "config.json").write_text(json.dumps(hf_config_dict(arch)))
    config = AutoConfig.from_pretrained(tmp_path)
    assert config.layer_types == ["full_attention"] * 3
    assert (config.attn_logit_softcapping, config.final_logit_softcapping) == (None, None)


# Gemma's four (1 + w) norms per layer amplify fp32 rounding (as in tests/test_family_gemma.py).
GRAD_RTOL = 5e-5


def test_packed_loss_and_lora_grads_equal_unpacked(checkpoint, cpu_parallel):
    from test_packing_numerics import check_packed_equals_unpacked, packed_and_unpacked

    directory, arch, _ = checkpoint
    out = packed_and_unpacked(str(directory), tp=1, sp=False, layout=cpu_parallel, arch=arch)
    check_packed_equals_unpacked(out, grad_rtol=GRAD_RTOL)


def test_tensor_parallel_equals_transformers(checkpoint, tmp_path):
    """At TP=2 with SP: gathered logits (capped on each vocabulary shard) equal transformers', packed loss (the
    vocab-parallel cross-entropy of capped logits) and LoRA grads equal unpacked ones."""
    from test_packing_numerics import check_packed_equals_unpacked

    directory, arch, hf = checkpoint
    run_world(tensor_parallel_worker, 2, {"gemma2": (str(directory), arch)}, str(tmp_path / "out"))
    with torch.no_grad():
        expected = hf(tokens(arch, shape=(2, 40))).logits
    for rank in range(2):
        results = torch.load(tmp_path / f"out.rank{rank}.pt")["gemma2"]
        assert (results["logits"] - expected).abs().max().item() <= 1e-4
        check_packed_equals_unpacked(results["packing"], grad_rtol=GRAD_RTOL)


def test_generation_and_scoring_use_capped_logits(checkpoint):
    """The KV-cache prefill's next-token logits (what sampling reads) and scoring's log-probabilities equal
    transformers'; greedy decoding with the cache (capped scores over a window shorter than the text), alone and
    batched, equals transformers' greedy search."""
    from nemo_customizer.inference import Generator
    from nemo_customizer.inference._kv_cache import prefill
    from nemo_customizer.inference.scoring import score_targets

    directory, arch, hf = checkpoint
    ids = tokens(arch, seed=7, shape=(1, 30))
    prompts = ["Gemma says hello!", "Hi", "a window of eight"]
    with torch.no_grad():
        expected = hf(ids).logits[0]  # (s, vocab)
    with Generator.from_config(tiny_generator_config(directory, arch)) as gen:
        logits, _ = prefill(gen.model, ids[0].tolist(), gen.device)
        scores = score_targets(gen.model, [ids[0].tolist()], [[0] * 10 + [1] * 20], device=gen.device)[0]
        encoded = [gen.encode(prompt) for prompt in prompts]
        alone = gen.complete(prompts[0], max_tokens=16)
        batch = gen.complete_batch(prompts, max_tokens=16)
    assert (logits - expected[-1]).abs().max().item() <= 1e-4
    wanted = torch.log_softmax(expected[9:-1], dim=-1).gather(1, ids[0, 10:, None]).squeeze(1)
    assert torch.allclose(torch.tensor(scores.logprobs), wanted, atol=1e-4)
    for prompt_ids, completion in zip(encoded, batch):
        greedy = hf.generate(torch.tensor([prompt_ids]), do_sample=False, max_new_tokens=16, eos_token_id=2,
                             pad_token_id=0)[0, len(prompt_ids):].tolist()
        assert completion.token_ids == greedy
    assert alone.token_ids == batch[0].token_ids


def test_kv_cache_generation_matches_transformers(tmp_path):
    """Prompts of 2 to 20 tokens, 16 new ones with a window of 8: alone and batched, as transformers' greedy search."""
    check_generation_matches_transformers(tmp_path, _arch(), ["Gemma says hello!", "Hi", "a window of eight"])
