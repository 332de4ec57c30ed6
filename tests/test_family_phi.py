"""Phi-3 / Phi-3.5 / Phi-4 (``Phi3ForCausalLM``: q/k/v and gate/up fused in HF) train, export and load like Llama:
tiny random checkpoints written with transformers' own classes (no downloads); logits, one LoRA step on PEFT's Phi
names (qkv_proj, o_proj, gate_up_proj, down_proj), PEFT and merged exports, packed training and TP=2 against
transformers (+ peft). Also: the config.json keys we cannot build are refused by name, and a Llama LoRA name on Phi
is a config error before any work."""

import dataclasses

import pytest
import torch

from _family_checks import (check_logits_match_transformers, check_lora_step_and_adapter_match_peft,
                            check_merged_export_loads_in_transformers, check_tensor_parallel_equals_transformers,
                            lora_model, positions, tokens)
from _tiny import (load_tiny_model, tiny_arch, write_classification_data, write_random_peft_adapter,
                   write_tiny_checkpoint)

TARGETS = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]  # what PEFT targets on Phi-3


def _arch(tied: bool = False):
    # GQA (4 heads, 2 key/value heads), so the fused q/k/v rows are reordered per query group
    return dataclasses.replace(tiny_arch(tied=tied, architecture="Phi3ForCausalLM"), bos_token_id=1, eos_token_id=2)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """tied → (directory, architecture, transformers model) of tiny random Phi3 checkpoints."""
    root = tmp_path_factory.mktemp("phi3")
    out = {}
    for tied in (False, True):
        arch = _arch(tied)
        directory = root / ("tied" if tied else "untied")
        out[tied] = directory, arch, write_tiny_checkpoint(directory, arch)
    return out


@pytest.fixture(scope="module")
def peft_adapter(checkpoints, tmp_path_factory):
    """A random peft adapter on PEFT's Phi names for the untied checkpoint: (directory, peft model)."""
    directory = tmp_path_factory.mktemp("phi3-adapter") / "adapter"
    return directory, write_random_peft_adapter(checkpoints[False][0], directory, TARGETS)


# --- config: what config.json says, and what we refuse -----------------------------------------------------------

# The official config.json values of the shipped Phi models (the keys our reader uses).
OFFICIAL = {
    "phi-4": dict(  # microsoft/phi-4
        architectures=["Phi3ForCausalLM"], model_type="phi3", attention_bias=False, hidden_act="silu",
        hidden_size=5120, intermediate_size=17920, num_hidden_layers=40, num_attention_heads=40,
        num_key_value_heads=10, vocab_size=100352, max_position_embeddings=16384,
        original_max_position_embeddings=16384, rope_scaling=None, rope_theta=250000, rms_norm_eps=1e-05,
        sliding_window=None, tie_word_embeddings=False, bos_token_id=100257, eos_token_id=100265,
        pad_token_id=100349),
    "phi-3.5-mini-instruct": dict(  # microsoft/Phi-3.5-mini-instruct (its long/short factors shortened here)
        architectures=["Phi3ForCausalLM"], model_type="phi3", attention_bias=False, hidden_act="silu",
        hidden_size=3072, intermediate_size=8192, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=32, vocab_size=32064, max_position_embeddings=131072,
        original_max_position_embeddings=4096, rope_theta=10000.0, rms_norm_eps=1e-05, sliding_window=262144,
        rope_scaling={"type": "longrope", "long_factor": [1.0] * 48, "short_factor": [1.0] * 48},
        tie_word_embeddings=False, bos_token_id=1, eos_token_id=32000, pad_token_id=32000),
}


def test_checkpoint_config_json_reads_as_phi3(checkpoints):
    from nemo_customizer.config import read_hf_config

    for directory, arch, _ in checkpoints.values():
        read = read_hf_config(directory)
        assert read.architectures == ["Phi3ForCausalLM"] and read.model_type == "phi3"
        assert read.tie_word_embeddings == arch.tie_word_embeddings


def test_shipped_phi4_yaml_matches_its_config_json():
    from nemo_customizer.config import architecture_from_hf, compose_config, merge_checkpoint_architecture

    model = compose_config(["model=phi-4"]).model
    merge_checkpoint_architecture(model, architecture_from_hf(OFFICIAL["phi-4"]))  # raises on any difference


def test_phi35_yaml_has_the_checkpoint_shape_but_its_longrope_is_refused():
    from nemo_customizer.config import ConfigError, architecture_from_hf, compose_config

    model = compose_config(["model=phi-3.5-mini-instruct"]).model
    without_rope = architecture_from_hf(dict(OFFICIAL["phi-3.5-mini-instruct"], rope_scaling=None))
    assert dataclasses.asdict(model.architecture) == dataclasses.asdict(without_rope)
    with pytest.raises(ConfigError, match="rope_scaling type 'longrope' is not supported.*Phi-3.5"):
        architecture_from_hf(OFFICIAL["phi-3.5-mini-instruct"])


@pytest.mark.parametrize("changes, words", [
    (dict(rope_scaling={"type": "su", "long_factor": [1.0], "short_factor": [1.0]}), ["rope_scaling", "'su'"]),
    (dict(partial_rotary_factor=0.75), ["partial_rotary_factor=0.75"]),
    (dict(rope_parameters={"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5}),
     ["partial_rotary_factor=0.5"]),
    (dict(sliding_window=2047, max_position_embeddings=4096), ["sliding_window=2047"]),  # Phi-3-mini-4k
    (dict(hidden_act="gelu"), ["hidden_act"]),
])
def test_unsupported_phi3_config_json_is_a_config_error(changes, words):
    from nemo_customizer.config import ConfigError, architecture_from_hf

    with pytest.raises(ConfigError) as error:
        architecture_from_hf(dict(OFFICIAL["phi-4"], **changes))
    for word in words:
        assert word in str(error.value)


def test_llama_lora_name_on_phi_is_a_config_error():
    from nemo_customizer.config import ConfigError, compose_config, validate_config

    cfg = compose_config(["model=phi-4", "model.random_weights=true", "dataset.path=data.jsonl",
                          "hyperparameters.lora.target_modules=[q_proj]"])
    with pytest.raises(ConfigError) as error:
        validate_config(cfg)
    for word in ("'q_proj'", "Phi3ForCausalLM", "qkv_proj", "gate_up_proj"):
        assert word in str(error.value)
    ok = compose_config(["model=phi-4", "model.random_weights=true", "dataset.path=data.jsonl",
                         "hyperparameters.lora.target_modules=[qkv_proj,o_proj,gate_up_proj,down_proj]"])
    validate_config(ok)


def test_llama_lora_name_on_a_phi_checkpoint_fails_before_reading_data(checkpoints, tmp_path, monkeypatch):
    """``model=hf``: the family (and its LoRA names) is known once config.json is read, still before any data."""
    from nemo_customizer import data
    from nemo_customizer.api import customize
    from nemo_customizer.config import ConfigError

    def no_reading(*args, **kwargs):
        raise AssertionError("the data was read before the LoRA targets were checked")

    monkeypatch.setattr(data, "load_dataset", no_reading)
    write_classification_data(tmp_path / "data", n_train=8, n_val=2)
    with pytest.raises(ConfigError, match="'v_proj'.*qkv_proj"):
        customize("hf", dataset=str(tmp_path / "data"), output_dir=str(tmp_path / "job"), device="cpu",
                  model={"checkpoint": str(checkpoints[False][0]), "max_seq_length": 64},
                  hyperparameters={"lora": {"target_modules": ["qkv_proj", "v_proj"]}})
    assert not (tmp_path / "job").exists()


# --- numerics against transformers (+ peft), one process ------------------------------------------------------


@pytest.mark.usefixtures("cpu_parallel")
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_logits_match_transformers(checkpoints, tied):
    directory, arch, hf = checkpoints[tied]
    check_logits_match_transformers(arch, directory, hf)


@pytest.mark.usefixtures("cpu_parallel")
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_lora_step_and_exported_adapter_match_peft(checkpoints, tmp_path, tied):
    """The exported adapter names PEFT's Phi modules (qkv_proj's B in HF's [q; k; v] rows, gate_up_proj's in
    [gate; up]); peft loads it with equal logits, and one step's loss and LoRA gradients equal peft's."""
    directory, arch, _ = checkpoints[tied]
    config = check_lora_step_and_adapter_match_peft(arch, directory, TARGETS, tmp_path)
    assert config["target_modules"] == sorted(TARGETS)


@pytest.mark.usefixtures("cpu_parallel")
def test_megatron_names_adapt_the_same_projections(checkpoints):
    from nemo_customizer.peft.apply import hf_projections, resolve_targets

    arch = checkpoints[False][1]
    projections = hf_projections(arch)
    assert resolve_targets(["linear_qkv", "linear_fc1"], projections) == {"linear_qkv": {"qkv_proj"},
                                                                          "linear_fc1": {"gate_up_proj"}}
    with pytest.raises(ValueError, match="'q_proj'"):
        resolve_targets(["q_proj"], projections)


@pytest.mark.usefixtures("cpu_parallel")
def test_peft_adapter_loads_into_our_model_and_the_server(checkpoints, peft_adapter):
    """An adapter peft wrote for Phi: loaded into our LoRA modules (training's path) and into the server's
    many-adapter layers, the logits equal peft's."""
    from nemo_customizer.peft.apply import apply_lora
    from nemo_customizer.peft.export import load_peft_adapter, read_lora_config
    from nemo_customizer.peft.multi_lora import MultiLoRA

    directory, arch, _ = checkpoints[False]
    adapter, peft_model = peft_adapter
    batch = tokens(arch, shape=(2, 40))
    pos = positions(batch)
    with torch.no_grad():
        expected = peft_model(batch).logits
        model = load_tiny_model(arch, directory).eval()
        apply_lora(model, arch, read_lora_config(adapter), seed=0)
        load_peft_adapter(model, adapter)
        assert (model(batch, pos, None, runtime_gather_output=True) - expected).abs().max().item() <= 1e-4

        served = load_tiny_model(arch, directory).eval()
        lora = MultiLoRA(served, arch, max_rank=8)
        info = lora.add("phi", adapter)
        assert info.target_modules == sorted(TARGETS)
        lora.select(["phi", None])
        logits = served(batch, pos, None, runtime_gather_output=True)
        assert (logits[0] - expected[0]).abs().max().item() <= 1e-4
        base = load_tiny_model(arch, directory).eval()(batch[1:], pos[1:], None, runtime_gather_output=True)
        assert (logits[1] - base[0]).abs().max().item() <= 1e-5


@pytest.mark.usefixtures("cpu_parallel")
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_merged_export_loads_in_transformers(checkpoints, tmp_path, tied):
    directory, arch, _ = checkpoints[tied]
    check_merged_export_loads_in_transformers(arch, directory, TARGETS, "phi3", tmp_path)


@pytest.mark.usefixtures("cpu_parallel")
def test_base_weights_export_back_to_the_fused_hf_tensors(checkpoints):
    from safetensors.torch import load_file

    from nemo_customizer.models.hf_state import hf_state_dict

    directory, arch, _ = checkpoints[False]
    model, _ = lora_model(arch, directory, TARGETS)
    exported, written = hf_state_dict(model, arch), load_file(str(directory / "model.safetensors"))
    assert exported.keys() == written.keys()
    for key, tensor in written.items():
        torch.testing.assert_close(exported[key], tensor, rtol=0, atol=0)


def test_packed_loss_and_lora_grads_equal_unpacked(checkpoints, cpu_parallel):
    from test_packing_numerics import check_packed_equals_unpacked, packed_and_unpacked

    directory, arch, _ = checkpoints[False]
    check_packed_equals_unpacked(packed_and_unpacked(str(directory), tp=1, sp=False, layout=cpu_parallel, arch=arch))


# --- TP=2 (+SP) over gloo ------------------------------------------------------------------------------------


def test_tensor_parallel_equals_transformers_and_peft(checkpoints, peft_adapter, tmp_path):
    """At TP=2: logits, packed vs unpacked training, and a peft adapter loaded into the shards (each rank its
    query group of qkv_proj's B and its half of gate_up_proj's gate and up rows) then exported back unchanged."""
    check_tensor_parallel_equals_transformers({"phi3": checkpoints[False]}, tmp_path, {"phi3": peft_adapter})
