"""Gemma 3 image-text checkpoints (``Gemma3ForConditionalGeneration``, 4B and larger) train as text models: tiny
random ones built with transformers' own classes (a Gemma 3 text model with interleaved windows, linear RoPE
scaling on the full layers, head_dim != hidden/heads; a SigLIP vision tower), saved in transformers 4's file layout
(``language_model.model.*``, transformers 5's default) and in transformers 5's (``model.language_model.*``), tied
and untied. config.json's ``text_config`` reads; our text logits, one LoRA step and the exported adapter equal
transformers'+peft's on the image-text model, the vision tower untouched; the merged export is the image-text model
again; a job with ``model=hf`` does all of it; a checkpoint without text weights fails clearly."""

import json
import logging

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from _family_checks import check_lora_step_and_adapter_match_peft, lora_model, positions, tokens
from _tiny import TINY_VOCAB, load_tiny_model, write_classification_data, write_tiny_tokenizer

from nemo_customizer.config.schema import ArchitectureConfig, RopeScalingConfig

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LAYER_TYPES = ["sliding_attention", "full_attention", "sliding_attention"]
# checkpoint name → (transformers 4's file layout, tied embeddings)
CHECKPOINTS = {"t4-tied": (True, True), "t5-untied": (False, False)}
TEXT_PREFIX = {True: "language_model.model.", False: "model.language_model."}
VISION_PREFIX = {True: "vision_tower.", False: "model.vision_tower."}


def _arch(tied: bool) -> ArchitectureConfig:
    """What config.json should read as."""
    return ArchitectureConfig(
        architectures=["Gemma3ForConditionalGeneration"], model_type="gemma3", num_hidden_layers=3, hidden_size=64,
        num_attention_heads=4, num_key_value_heads=2, head_dim=24, intermediate_size=128, vocab_size=TINY_VOCAB,
        rope_theta=1e6, rope_scaling=RopeScalingConfig(rope_type="linear", factor=2.0), rms_norm_eps=1e-6,
        tie_word_embeddings=tied, max_position_embeddings=256, sliding_window=8, layer_types=LAYER_TYPES,
        query_pre_attn_scalar=20, rope_local_base_freq=100.0, bos_token_id=1, eos_token_id=2)


def _write_image_text_checkpoint(directory, transformers4_layout: bool, tied: bool):
    """A random tiny Gemma3ForConditionalGeneration saved by transformers (norms of the text model around 0: they
    scale by 1 + w) with a byte tokenizer; returns the model (fp32, eval mode)."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3TextConfig, SiglipVisionConfig

    text = Gemma3TextConfig(
        vocab_size=TINY_VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=24, max_position_embeddings=256, sliding_window=8, query_pre_attn_scalar=20,
        layer_types=LAYER_TYPES, tie_word_embeddings=tied, bos_token_id=1, eos_token_id=2, pad_token_id=0,
        rope_parameters={"full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 100.0}})
    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
                                image_size=28, patch_size=14, vision_use_head=False)
    config = Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=1, tie_word_embeddings=tied)
    torch.manual_seed(0)
    model = Gemma3ForConditionalGeneration(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.uniform_(-0.5, 0.5)
    model.save_pretrained(directory, save_original_format=transformers4_layout)
    write_tiny_tokenizer(directory)
    return model


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """name → (directory, architecture, transformers model, transformers 4 layout)."""
    out = {}
    for name, (transformers4_layout, tied) in CHECKPOINTS.items():
        directory = tmp_path_factory.mktemp("gemma3-image-text") / name
        hf = _write_image_text_checkpoint(directory, transformers4_layout, tied)
        with safe_open(str(directory / "model.safetensors"), "pt") as handle:  # the layout we meant to write
            names = list(handle.keys())
        assert any(n.startswith(TEXT_PREFIX[transformers4_layout]) for n in names)
        assert any(n.startswith(VISION_PREFIX[transformers4_layout]) for n in names)
        out[name] = (directory, _arch(tied), hf, transformers4_layout)
    return out


def _image_features(model, seed: int = 7) -> torch.Tensor:
    """The vision tower + projector's output for a random image."""
    pixels = torch.randn(1, 3, 28, 28, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model.get_image_features(pixels).pooler_output


# --- a job, model=hf: adapter and merged export load where the original does ---------------------------------------


def test_lora_merged_job_exports_the_image_text_model(checkpoints, tmp_path):
    """``customize("hf")`` with ``lora_merged``: the adapter (on the image-text model, in peft) and the merged model
    (Gemma3ForConditionalGeneration in transformers) give the same logits, and the vision tower is the source's."""
    from peft import PeftModel
    from transformers import Gemma3ForConditionalGeneration

    from nemo_customizer.api import customize

    directory, arch, base, _ = checkpoints["t4-tied"]
    write_classification_data(tmp_path / "data", n_train=32, n_val=4)
    result = customize("hf", dataset=str(tmp_path / "data"), output_dir=str(tmp_path / "job"), device="cpu",
                       progress_bar=False, model={"checkpoint": str(directory), "max_seq_length": 64},
                       hyperparameters={"finetuning_type": "lora_merged", "epochs": 1, "batch_size": 16,
                                        "micro_batch_size": 8, "learning_rate": 1e-2, "max_steps": 2,
                                        "lora": {"adapter_dropout": 0.0, "target_modules": TARGETS}})
    adapter_config = json.loads((tmp_path / "job/adapter/adapter_config.json").read_text())
    assert isinstance(adapter_config["target_modules"], str)
    merged = Gemma3ForConditionalGeneration.from_pretrained(str(tmp_path / "job/model")).eval()
    adapted = PeftModel.from_pretrained(Gemma3ForConditionalGeneration.from_pretrained(str(directory)),
                                        str(tmp_path / "job/adapter")).eval()
    ids = tokens(arch, seed=5, shape=(2, 24))
    with torch.no_grad():
        expected, actual = adapted(ids).logits, merged(ids).logits
        assert (expected - base(ids).logits).abs().max() > 1e-3  # training changed the model
    assert (actual - expected).abs().max().item() <= 1e-4
    torch.testing.assert_close(_image_features(merged), _image_features(base), rtol=0, atol=0)
    assert result is not None


# --- config.json ----------------------------------------------------------------------------------------------

GEMMA_3_4B_IT = {  # google/gemma-3-4b-it's config.json (transformers 4.50): text_config lists only non-defaults
    "architectures": ["Gemma3ForConditionalGeneration"], "boi_token_index": 255999, "eoi_token_index": 256000,
    "eos_token_id": [1, 106], "image_token_index": 262144, "initializer_range": 0.02, "mm_tokens_per_image": 256,
    "model_type": "gemma3",
    "text_config": {"hidden_size": 2560, "intermediate_size": 10240, "model_type": "gemma3_text",
                    "num_hidden_layers": 34, "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
                    "sliding_window": 1024},
    "torch_dtype": "bfloat16", "transformers_version": "4.50.0.dev0",
    "vision_config": {"hidden_size": 1152, "image_size": 896, "intermediate_size": 4304,
                      "model_type": "siglip_vision_model", "num_attention_heads": 16, "num_hidden_layers": 27,
                      "patch_size": 14, "vision_use_head": False},
}


def test_shipped_yaml_matches_its_config_json():
    from nemo_customizer.config import architecture_from_hf, compose_config, merge_checkpoint_architecture

    arch = architecture_from_hf(GEMMA_3_4B_IT)  # Gemma3TextConfig's defaults where text_config is silent
    assert (arch.vocab_size, arch.num_attention_heads, arch.num_key_value_heads, arch.head_dim) == (262208, 8, 4, 256)
    assert (arch.max_position_embeddings, arch.query_pre_attn_scalar, arch.rope_local_base_freq) == (131072, 256, 1e4)
    assert arch.rope_scaling.rope_type == "linear" and arch.rope_scaling.factor == 8.0
    assert [i for i, kind in enumerate(arch.layer_types) if kind == "full_attention"] == [5, 11, 17, 23, 29]
    assert (arch.tie_word_embeddings, arch.bos_token_id, arch.eos_token_ids) == (True, 2, [1, 106])
    merge_checkpoint_architecture(compose_config(["model=gemma-3-4b-it"]).model, arch)  # raises on any difference


def test_checkpoint_config_json_reads_its_text_config(checkpoints):
    """transformers 5's config.json (every text key spelled out, rope_parameters per layer type)."""
    from nemo_customizer.config import read_hf_config

    for directory, arch, _, _ in checkpoints.values():
        assert read_hf_config(directory) == arch


def test_model_hf_picks_the_text_family(checkpoints):
    from nemo_customizer.checkpoints.resolve import resolve_model
    from nemo_customizer.config import compose_config, validate_config

    directory, arch, _, _ = checkpoints["t5-untied"]
    cfg = compose_config(["model=hf", f"model.checkpoint={directory}", "model.max_seq_length=64",
                          "dataset.path=data.jsonl",
                          f"hyperparameters.lora.target_modules=[{','.join(TARGETS)}]"])
    validate_config(cfg)
    assert resolve_model(cfg.model, None).config.architecture == arch


@pytest.mark.parametrize("changes, words", [
    (dict(text_config=None), ["Gemma3ForConditionalGeneration", "text_config"]),
    (dict(text_config={"hidden_activation": "relu"}), ["hidden_activation", "relu"]),
])
def test_bad_image_text_config_json_is_a_config_error(changes, words):
    from nemo_customizer.config import ConfigError, architecture_from_hf

    with pytest.raises(ConfigError) as error:
        architecture_from_hf({**GEMMA_3_4B_IT, **changes})
    for word in words:
        assert word in str(error.value)


# --- numerics against transformers (+ peft), one process ------------------------------------------------------


@pytest.mark.usefixtures("cpu_parallel")
@pytest.mark.parametrize("name", sorted(CHECKPOINTS))
def test_text_logits_match_transformers(checkpoints, name):
    """Our logits equal Gemma3ForConditionalGeneration's on text (input_ids only), in either file layout."""
    directory, arch, hf, _ = checkpoints[name]
    ours = load_tiny_model(arch, directory).eval()
    ids = tokens(arch, shape=(2, 40))
    with torch.no_grad():
        expected, actual = hf(ids).logits, ours(ids, positions(ids), None, runtime_gather_output=True)
    assert expected.std() > 0.1 and (actual - expected).abs().max().item() <= 1e-4


@pytest.mark.usefixtures("cpu_parallel")
@pytest.mark.parametrize("name", sorted(CHECKPOINTS))
def test_lora_step_and_exported_adapter_match_peft_on_the_image_text_model(checkpoints, name, tmp_path):
    """The adapter names the image-text model's modules; peft loads it onto Gemma3ForConditionalGeneration with our
    logits, one step's loss and LoRA grads equal, and wraps no vision module (the grads compared are all of peft's
    trainable parameters)."""
    from peft import PeftModel
    from transformers import Gemma3ForConditionalGeneration

    from nemo_customizer.peft.export import read_lora_config

    directory, arch, _, _ = checkpoints[name]
    config = check_lora_step_and_adapter_match_peft(arch, directory, TARGETS, tmp_path)
    weights = load_file(str(tmp_path / "adapter/adapter_model.safetensors"))
    assert all(key.startswith("base_model.model.model.language_model.layers.") for key in weights)
    assert read_lora_config(tmp_path / "adapter").target_modules == sorted(TARGETS)  # our own expression reads back
    assert isinstance(config["target_modules"], str)
    peft_model = PeftModel.from_pretrained(Gemma3ForConditionalGeneration.from_pretrained(str(directory)),
                                           str(tmp_path / "adapter"))
    wrapped = [n for n, m in peft_model.named_modules() if hasattr(m, "lora_A")]
    assert len(wrapped) == len(TARGETS) * arch.num_hidden_layers
    assert all(".language_model.layers." in n for n in wrapped)


@pytest.mark.usefixtures("cpu_parallel")
def test_exported_adapter_loads_back_into_our_model_and_the_server(checkpoints, tmp_path):
    """Our adapter readers take the image-text naming (and the target expression) back: training's LoRA modules
    and the server's many-adapter layers give the logits of the model that exported it."""
    from nemo_customizer.peft.apply import apply_lora
    from nemo_customizer.peft.export import load_peft_adapter, read_lora_config, save_peft_adapter
    from nemo_customizer.peft.multi_lora import MultiLoRA

    directory, arch, _, _ = checkpoints["t4-tied"]
    model, lora = lora_model(arch, directory, TARGETS, seed=6)
    save_peft_adapter(model, lora, tmp_path / "adapter", base_model=str(directory), architecture=arch)
    ids = tokens(arch, seed=5)
    with torch.no_grad():
        expected = model.eval()(ids, positions(ids), None, runtime_gather_output=True)
        fresh = load_tiny_model(arch, directory).eval()
        apply_lora(fresh, arch, read_lora_config(tmp_path / "adapter"), seed=0)
        load_peft_adapter(fresh, tmp_path / "adapter")
        torch.testing.assert_close(fresh(ids, positions(ids), None, runtime_gather_output=True), expected,
                                   rtol=0, atol=0)

        served = load_tiny_model(arch, directory).eval()
        adapters = MultiLoRA(served, arch, max_rank=8)
        assert adapters.add("tuned", tmp_path / "adapter").target_modules == sorted(TARGETS)
        adapters.select(["tuned", "tuned"])
        assert (served(ids, positions(ids), None, runtime_gather_output=True) - expected).abs().max().item() <= 1e-5


@pytest.mark.usefixtures("cpu_parallel")
@pytest.mark.parametrize("name", sorted(CHECKPOINTS))
def test_merged_export_is_the_image_text_model_in_its_layout(checkpoints, name, tmp_path):
    """``lora_merged`` / ``all_weights``: the source's tensor names (text merged, vision tensors bit for bit) and
    config.json; transformers loads Gemma3ForConditionalGeneration with our logits and the source's vision tower."""
    from transformers import AutoModelForCausalLM

    from nemo_customizer.checkpoints.hf_export import save_hf_checkpoint
    from nemo_customizer.models.hf_state import hf_state_dict
    from nemo_customizer.peft.export import adapter_state_dict
    from nemo_customizer.peft.merge import merge_lora_into_hf

    directory, arch, base, transformers4_layout = checkpoints[name]
    model, lora = lora_model(arch, directory, TARGETS, seed=4)
    state = merge_lora_into_hf(hf_state_dict(model, arch), adapter_state_dict(model), lora.alpha / lora.adapter_dim)
    save_hf_checkpoint(state, arch, tmp_path / "merged", source_dir=directory)

    source = load_file(str(directory / "model.safetensors"))
    exported = load_file(str(tmp_path / "merged/model.safetensors"))
    assert exported.keys() == source.keys()
    for key in source:
        if key.startswith(VISION_PREFIX[transformers4_layout]) or "multi_modal_projector" in key:
            torch.testing.assert_close(exported[key], source[key], rtol=0, atol=0)
    assert json.loads((tmp_path / "merged/config.json").read_text())["architectures"] == arch.architectures

    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged")).eval()
    assert type(hf).__name__ == "Gemma3ForConditionalGeneration"
    ids = tokens(arch, seed=5)
    with torch.no_grad():
        ours = model.eval()(ids, positions(ids), None, runtime_gather_output=True)
        assert (hf(ids).logits - ours).abs().max().item() <= 1e-4
        assert (base(ids).logits - ours).abs().max().item() > 1e-3  # the adapters count
    torch.testing.assert_close(_image_features(hf), _image_features(base), rtol=0, atol=0)


@pytest.mark.usefixtures("cpu_parallel")
def test_export_without_a_source_checkpoint_is_the_text_model_alone(checkpoints, tmp_path, caplog):
    """Random weights (no checkpoint to copy a vision tower from): a Gemma3ForCausalLM, and the log says so."""
    from transformers import AutoModelForCausalLM

    from nemo_customizer.checkpoints.hf_export import save_hf_checkpoint
    from nemo_customizer.models.hf_state import hf_state_dict

    directory, arch, _, _ = checkpoints["t5-untied"]
    model = load_tiny_model(arch, directory).eval()
    with caplog.at_level(logging.WARNING, logger="nemo_customizer.checkpoints.hf_export"):
        save_hf_checkpoint(hf_state_dict(model, arch), arch, tmp_path / "text", source_dir=None)
    assert "Gemma3ForCausalLM" in caplog.text and "vision tower" in caplog.text
    config = json.loads((tmp_path / "text/config.json").read_text())
    assert (config["architectures"], config["model_type"]) == (["Gemma3ForCausalLM"], "gemma3_text")
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "text")).eval()
    ids = tokens(arch, seed=5)
    with torch.no_grad():
        ours = model(ids, positions(ids), None, runtime_gather_output=True)
        assert (hf(ids).logits - ours).abs().max().item() <= 1e-4


# --- what is refused ------------------------------------------------------------------------------------------


def _copy_with(directory, target, keep):
    """``directory``'s config.json and the tensors whose names ``keep`` accepts, in ``target``."""
    target.mkdir()
    (target / "config.json").write_text((directory / "config.json").read_text())
    tensors = load_file(str(directory / "model.safetensors"))
    save_file({k: v for k, v in tensors.items() if keep(k)}, str(target / "model.safetensors"))


@pytest.mark.usefixtures("cpu_parallel")
def test_checkpoint_without_text_weights_fails_clearly(checkpoints, tmp_path):
    directory, arch, _, _ = checkpoints["t4-tied"]
    _copy_with(directory, tmp_path / "vision-only", lambda name: not name.startswith("language_model."))
    with pytest.raises(ValueError, match="no text-model weights.*language_model.model.*model.language_model"):
        load_tiny_model(arch, tmp_path / "vision-only")


@pytest.mark.usefixtures("cpu_parallel")
def test_tensors_of_neither_tower_fail_clearly(checkpoints, tmp_path):
    directory, arch, _, _ = checkpoints["t5-untied"]
    target = tmp_path / "odd"
    _copy_with(directory, target, lambda name: True)
    tensors = load_file(str(target / "model.safetensors"))
    tensors["audio_tower.weight"] = torch.zeros(2)
    save_file(tensors, str(target / "model.safetensors"))
    with pytest.raises(ValueError, match="audio_tower.weight.*neither"):
        load_tiny_model(arch, target)


def test_model_type_alone_names_the_family():
    """A config.json without ``architectures``: ``model_type`` tells the image-text model from the text one."""
    from nemo_customizer.config.families import family_of

    assert family_of([], "gemma3").image_text and not family_of([], "gemma3_text").image_text
