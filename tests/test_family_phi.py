"""Phi-3 / Phi-3.5 / Phi-4 (``Phi3ForCausalLM``: q/k/v and gate/up fused in HF) train, export and load like Llama:
tiny random checkpoints written with transformers' own classes (no downloads); logits, one LoRA step on PEFT's Phi
names (qkv_proj, o_proj, gate_up_proj, down_proj), PEFT and merged exports, packed training and TP=2 against
transformers (+ peft). Phi-3.5's longrope RoPE (short and long factors, the attention factor) on sequences shorter
and longer than its original context, padded, packed and in KV-cache generation; Phi-3-mini-4k's sliding window.
Also: the config.json keys we cannot build are refused by name, a Llama LoRA name on Phi is a config error before
any work, and LoRA without target_modules adapts qkv_proj."""

import dataclasses
import json
import math

import pytest
import torch

from _family_checks import (check_generation_matches_transformers, check_logits_match_transformers,
                            check_lora_step_and_adapter_match_peft, check_merged_export_loads_in_transformers,
                            check_tensor_parallel_equals_transformers, lora_model, packed_logits, positions, tokens)
from _tiny import (TINY_VOCAB, load_tiny_model, tiny_arch, tiny_generator_config, write_classification_data,
                   write_random_peft_adapter, write_tiny_checkpoint, write_tiny_model_dir)

TARGETS = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]  # what PEFT targets on Phi-3
ORIGINAL = 32  # the tiny longrope checkpoint's original_max_position_embeddings: sequences of 24 and 40 tokens
WINDOW = 8  # the tiny windowed checkpoint's sliding_window, shorter than the test sequences


def _longrope(original: int = ORIGINAL, **extra):
    """Unequal factors per frequency (8 of them for head_dim 16), short and long far apart."""
    from nemo_customizer.config.schema import RopeScalingConfig

    return RopeScalingConfig(rope_type="longrope", original_max_position_embeddings=original,
                             short_factor=[1.0 + 0.1 * i for i in range(8)],
                             long_factor=[1.5 ** i for i in range(8)], **extra)


def _arch(tied: bool = False, **changes):
    # GQA (4 heads, 2 key/value heads), so the fused q/k/v rows are reordered per query group
    arch = dataclasses.replace(tiny_arch(tied=tied, architecture="Phi3ForCausalLM"), bos_token_id=1, eos_token_id=2)
    return dataclasses.replace(arch, **changes)


VARIANTS = {  # name → the tiny checkpoint's architecture
    "untied": _arch(),
    "tied": _arch(tied=True),
    "longrope": _arch(rope_scaling=_longrope()),  # Phi-3.5-mini, Phi-3-128k
    "windowed": _arch(sliding_window=WINDOW),  # Phi-3-mini-4k
}


@pytest.fixture(scope="module")
def variants(tmp_path_factory):
    """name → (directory, architecture, transformers model) of tiny random Phi3 checkpoints."""
    root = tmp_path_factory.mktemp("phi3")
    return {name: (root / name, arch, write_tiny_checkpoint(root / name, arch)) for name, arch in VARIANTS.items()}


@pytest.fixture(scope="module")
def checkpoints(variants):
    """tied → (directory, architecture, transformers model) of the plain tiny Phi3 checkpoints."""
    return {False: variants["untied"], True: variants["tied"]}


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
    "phi-3.5-mini-instruct": dict(  # microsoft/Phi-3.5-mini-instruct (its 48 long and short factors stand-ins here)
        architectures=["Phi3ForCausalLM"], model_type="phi3", attention_bias=False, hidden_act="silu",
        hidden_size=3072, intermediate_size=8192, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=32, vocab_size=32064, max_position_embeddings=131072,
        original_max_position_embeddings=4096, rope_theta=10000.0, rms_norm_eps=1e-05, sliding_window=262144,
        rope_scaling={"type": "longrope", "long_factor": [4.0] * 48, "short_factor": [1.0] * 48},
        tie_word_embeddings=False, bos_token_id=1, eos_token_id=32000, pad_token_id=32000),
}


def test_checkpoint_config_json_reads_as_phi3(variants):
    from nemo_customizer.config import read_hf_config

    for directory, arch, _ in variants.values():
        read = read_hf_config(directory)
        assert read.architectures == ["Phi3ForCausalLM"] and read.model_type == "phi3"
        assert read.tie_word_embeddings == arch.tie_word_embeddings
        assert (read.rope_scaling, read.sliding_window) == (arch.rope_scaling, arch.sliding_window)


def test_shipped_phi4_yaml_matches_its_config_json():
    from nemo_customizer.config import architecture_from_hf, compose_config, merge_checkpoint_architecture

    model = compose_config(["model=phi-4"]).model
    merge_checkpoint_architecture(model, architecture_from_hf(OFFICIAL["phi-4"]))  # raises on any difference


def test_phi35_yaml_has_the_checkpoint_shape_and_sends_its_longrope_to_model_hf():
    """The YAML (weight-free runs) lacks the checkpoint's longrope factors: with the real checkpoint it is a
    mismatch whose error says to use model=hf, which reads them."""
    from nemo_customizer.config import ConfigError, architecture_from_hf, compose_config, merge_checkpoint_architecture
    from nemo_customizer.config.hf_config import longrope_attention_scale

    model = compose_config(["model=phi-3.5-mini-instruct"]).model
    without_rope = architecture_from_hf(dict(OFFICIAL["phi-3.5-mini-instruct"], rope_scaling=None))
    assert dataclasses.asdict(model.architecture) == dataclasses.asdict(without_rope)
    checkpoint = architecture_from_hf(OFFICIAL["phi-3.5-mini-instruct"])
    with pytest.raises(ConfigError, match="rope_scaling is None in the model YAML but .* use model=hf") as error:
        merge_checkpoint_architecture(model, checkpoint)
    assert len(str(error.value)) < 600  # the factor lists are cut short
    scaling = checkpoint.rope_scaling
    assert (scaling.rope_type, scaling.original_max_position_embeddings) == ("longrope", 4096)
    assert (scaling.short_factor, scaling.long_factor, scaling.attention_factor) == ([1.0] * 48, [4.0] * 48, None)
    # transformers' default for a 32x extension of a 4096-token context
    assert longrope_attention_scale(checkpoint) == pytest.approx(math.sqrt(1 + math.log(32) / math.log(4096)))
    assert checkpoint.sliding_window == 262144  # longer than the context: it never drops a key


@pytest.mark.parametrize("changes, original, attention_factor", [
    ({}, 4096, None),
    ({"rope_scaling": {"type": "su", "short_factor": [1.0] * 48, "long_factor": [4.0] * 48}}, 4096, None),
    # transformers 5's layout; the top-level original_max_position_embeddings wins over the rope dict's, as in
    # Phi3Config (which also assumes 4096 where the top-level key is absent)
    ({"rope_scaling": None, "rope_parameters": {"rope_type": "longrope", "rope_theta": 10000.0,
      "short_factor": [1.0] * 48, "long_factor": [4.0] * 48, "original_max_position_embeddings": 2048}},
     4096, None),
    ({"original_max_position_embeddings": "absent",
      "rope_scaling": {"type": "longrope", "short_factor": [1.0] * 48, "long_factor": [4.0] * 48,
                       "original_max_position_embeddings": 2048}}, 4096, None),
    ({"original_max_position_embeddings": 8192}, 8192, None),
    ({"rope_scaling": {"type": "longrope", "short_factor": [1.0] * 48, "long_factor": [4.0] * 48, "factor": 8.0}},
     4096, math.sqrt(1 + math.log(8) / math.log(4096))),  # an explicit factor sets the default attention factor
    ({"rope_scaling": {"type": "longrope", "short_factor": [1.0] * 48, "long_factor": [4.0] * 48,
                       "attention_factor": 1.5, "factor": 8.0}}, 4096, 1.5),
])
def test_longrope_config_json_forms(changes, original, attention_factor):
    from nemo_customizer.config import architecture_from_hf

    data = dict(OFFICIAL["phi-3.5-mini-instruct"], **changes)
    if data["original_max_position_embeddings"] == "absent":
        del data["original_max_position_embeddings"]
    scaling = architecture_from_hf(data).rope_scaling
    assert (scaling.rope_type, scaling.original_max_position_embeddings) == ("longrope", original)
    assert scaling.attention_factor == (None if attention_factor is None else pytest.approx(attention_factor))


@pytest.mark.parametrize("changes, window", [
    (dict(sliding_window=2047, max_position_embeddings=4096), 2047),  # Phi-3-mini-4k: every layer windowed
    (dict(sliding_window=None), None),
    ({}, None),  # Phi3Config has no window where the key is absent (Mistral's class assumes 4096)
    (dict(sliding_window=2047, use_sliding_window=False, layer_types=["full_attention"] * 40), 2047),  # not its keys
])
def test_sliding_window_from_config_json(changes, window):
    from nemo_customizer.config import architecture_from_hf

    data = {k: v for k, v in OFFICIAL["phi-4"].items() if k != "sliding_window"}
    arch = architecture_from_hf(dict(data, **changes))
    assert (arch.sliding_window, arch.layer_types) == (window, None)


@pytest.mark.parametrize("changes, words", [
    (dict(rope_scaling={"type": "yarn", "factor": 4.0}), ["rope_scaling type 'yarn'", "Phi-3: only longrope"]),
    (dict(rope_scaling={"type": "llama3", "factor": 8.0}), ["rope_scaling type 'llama3'", "Phi-3: only longrope"]),
    (dict(rope_scaling={"type": "longrope", "long_factor": [1.0], "short_factor": "1.0"}),
     ["rope_scaling.short_factor must be a list of numbers"]),
    (dict(partial_rotary_factor=0.75), ["partial_rotary_factor=0.75"]),
    (dict(rope_parameters={"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5}),
     ["partial_rotary_factor=0.5"]),
    (dict(hidden_act="gelu"), ["hidden_act"]),
])
def test_unsupported_phi3_config_json_is_a_config_error(changes, words):
    from nemo_customizer.config import ConfigError, architecture_from_hf

    with pytest.raises(ConfigError) as error:
        architecture_from_hf(dict(OFFICIAL["phi-4"], **changes))
    for word in words:
        assert word in str(error.value)


def test_longrope_factors_of_the_wrong_length_are_a_config_error_from_model_hf():
    from nemo_customizer.config import ConfigError, architecture_from_hf
    from nemo_customizer.config.validate import validate_architecture

    data = dict(OFFICIAL["phi-3.5-mini-instruct"], rope_scaling={"type": "su", "long_factor": [1.0] * 48,
                                                                 "short_factor": [1.0] * 64})
    with pytest.raises(ConfigError, match="config.json.rope_scaling.short_factor must list 48 .* got 64 numbers"):
        validate_architecture(architecture_from_hf(data), prefix="config.json")


def test_unset_lora_targets_adapt_qkv_proj_on_phi():
    """The product's default LoRA targets are the query and value projections; Phi-3 holds them in qkv_proj."""
    from nemo_customizer.config import compose_config, validate_config

    cfg = compose_config(["model=phi-4", "model.random_weights=true", "dataset.path=data.jsonl"])
    assert cfg.hyperparameters.lora.target_modules is None
    validate_config(cfg)  # no error for the default


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
@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_logits_match_transformers(variants, name):
    directory, arch, hf = variants[name]
    check_logits_match_transformers(arch, directory, hf)


def _padded_logits(arch, directory, ids):
    with torch.no_grad():
        return load_tiny_model(arch, directory).eval()(ids, positions(ids), None, runtime_gather_output=True)


@pytest.mark.usefixtures("cpu_parallel")
def test_longrope_logits_on_both_sides_of_the_original_context(variants):
    """Sequences of up to ``original_max_position_embeddings`` tokens rotate with the short factors, longer ones
    with the long factors, both scaled by the attention factor, as transformers does; each of the three matters."""
    directory, arch, hf = variants["longrope"]
    short_only = dataclasses.replace(arch, rope_scaling=dataclasses.replace(arch.rope_scaling,
                                                                            long_factor=arch.rope_scaling.short_factor))
    unscaled = dataclasses.replace(arch, rope_scaling=dataclasses.replace(arch.rope_scaling, attention_factor=1.0))
    for length in (ORIGINAL - 8, ORIGINAL, ORIGINAL + 1, ORIGINAL + 8):
        ids = tokens(arch, seed=length, shape=(2, length))
        with torch.no_grad():
            expected = hf(ids).logits
        assert (_padded_logits(arch, directory, ids) - expected).abs().max().item() <= 1e-4, length
        assert (_padded_logits(unscaled, directory, ids) - expected).abs().max().item() > 1e-3, length
        differs = (_padded_logits(short_only, directory, ids) - expected).abs().max().item() > 1e-3
        assert differs == (length > ORIGINAL), length


@pytest.mark.usefixtures("cpu_parallel")
@pytest.mark.parametrize("name, lengths", [
    # transformers would rotate a whole batch with the long factors once one sequence is long; here each packed
    # sequence decides by its own length, which is transformers' result for that sequence alone
    ("longrope", [ORIGINAL + 8, 5, ORIGINAL, ORIGINAL + 1, 12]),
    ("windowed", [30, 5, WINDOW, 19]),  # the window restarts at every sequence
])
def test_packed_sequences_match_transformers_on_each_alone(variants, name, lengths):
    directory, arch, hf = variants[name]
    rows = [tokens(arch, seed=10 + i, shape=(1, n)) for i, n in enumerate(lengths)]
    for row, actual in zip(rows, packed_logits(arch, directory, rows)):
        with torch.no_grad():
            assert (actual - hf(row).logits[0]).abs().max().item() <= 1e-4, row.shape[1]


@pytest.mark.usefixtures("cpu_parallel")
def test_window_bites_like_transformers(variants):
    """Phi-3-mini-4k's sliding window (every layer): at 40 tokens a model without the window differs."""
    directory, arch, hf = variants["windowed"]
    ids = tokens(arch, shape=(2, 40))
    with torch.no_grad():
        expected = hf(ids).logits
    without_window = _padded_logits(dataclasses.replace(arch, sliding_window=None), directory, ids)
    assert (without_window - expected).abs().max() > 1e-2


@pytest.mark.usefixtures("cpu_parallel")
@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_lora_step_and_exported_adapter_match_peft(variants, tmp_path, name):
    """The exported adapter names PEFT's Phi modules (qkv_proj's B in HF's [q; k; v] rows, gate_up_proj's in
    [gate; up]); peft loads it with equal logits, and one step's loss and LoRA gradients equal peft's (40 tokens:
    past the longrope checkpoint's original context and the windowed one's window)."""
    directory, arch, _ = variants[name]
    config = check_lora_step_and_adapter_match_peft(arch, directory, TARGETS, tmp_path, length=40)
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
@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_merged_export_loads_in_transformers(variants, tmp_path, name):
    """A config.json written from the architecture alone carries longrope (its factors and Phi3Config's top-level
    original_max_position_embeddings) and the window: transformers' logits equal ours at 40 tokens."""
    directory, arch, _ = variants[name]
    check_merged_export_loads_in_transformers(arch, directory, TARGETS, "phi3", tmp_path, length=40)
    config = json.loads((tmp_path / "merged/config.json").read_text())
    assert config.get("sliding_window") == arch.sliding_window and "layer_types" not in config
    if arch.rope_scaling is not None:
        assert config["original_max_position_embeddings"] == ORIGINAL
        assert config["rope_scaling"] == {"rope_type": "longrope", "short_factor": arch.rope_scaling.short_factor,
                                          "long_factor": arch.rope_scaling.long_factor}


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


@pytest.mark.parametrize("name", ["untied", "longrope", "windowed"])
def test_packed_loss_and_lora_grads_equal_unpacked(variants, cpu_parallel, name):
    """Examples of 3 to 30 tokens: within the longrope checkpoint's original context (its attention factor applies
    all the same), and past the windowed checkpoint's window."""
    from test_packing_numerics import check_packed_equals_unpacked, packed_and_unpacked

    directory, arch, _ = variants[name]
    check_packed_equals_unpacked(packed_and_unpacked(str(directory), tp=1, sp=False, layout=cpu_parallel, arch=arch))


# --- TP=2 (+SP) over gloo ------------------------------------------------------------------------------------


def test_tensor_parallel_equals_transformers_and_peft(variants, peft_adapter, tmp_path):
    """At TP=2: logits (longrope: past its original context; windowed: past the window), packed vs unpacked
    training, and a peft adapter loaded into the shards (each rank its query group of qkv_proj's B and its half of
    gate_up_proj's gate and up rows) then exported back unchanged."""
    cases = {name: variants[name] for name in ("untied", "longrope", "windowed")}
    check_tensor_parallel_equals_transformers(cases, tmp_path, {"untied": peft_adapter})


# --- generation (each builds its own one-process model; after the tests that share cpu_parallel) ---------------


def test_longrope_generation_matches_transformers_on_the_whole_sequence(tmp_path, monkeypatch):
    """KV-cache generation, alone and in one batch (rows at different lengths): prompts that start within the
    original context and grow past it, and one longer than it from the start. Every step's logits equal
    transformers' forward over that row's whole sequence so far: each row switches to the long factors when its own
    tokens pass the original context, and is prefilled again then."""
    from nemo_customizer.inference import Generator
    from nemo_customizer.inference.continuous import ContinuousBatch
    from nemo_customizer.inference.generator import Row

    original = 16
    arch = dataclasses.replace(tiny_arch(vocab=TINY_VOCAB, architecture="Phi3ForCausalLM"), bos_token_id=1,
                               eos_token_id=2, rope_scaling=_longrope(original))
    hf = write_tiny_model_dir(tmp_path, arch)
    steps = {}  # id(row) → the logits each of its tokens was chosen from
    push = Row.push

    def recording_push(row, logits):
        steps.setdefault(id(row), []).append(logits.clone())
        push(row, logits)

    monkeypatch.setattr(Row, "push", recording_push)
    prompts = ["Phi", "a prompt longer than sixteen tokens", "Hi there", "sixteen tokens.."]
    with Generator.from_config(tiny_generator_config(tmp_path, arch)) as gen:
        alone = gen.new_row(gen.encode(prompts[0]), max_tokens=24)
        batch = [gen.new_row(gen.encode(prompt), max_tokens=24) for prompt in prompts]
        for rows in ([alone], batch):
            decoding = ContinuousBatch(gen, max_rows=len(rows))
            for row in rows:
                decoding.add(row)
            with torch.inference_mode():
                while decoding.active:
                    decoding.step()
    # one token per byte; 16 tokens: its first decode step is the first forward past the original context
    assert [len(row.prompt_ids) for row in batch] == [3, 35, 8, 16]
    assert all(len(row.generated) == 24 for row in batch if row.generated[-1] != 2)
    assert alone.generated == batch[0].generated
    for row in [alone, *batch]:
        assert len(steps[id(row)]) == len(row.generated)
        for k, actual in enumerate(steps[id(row)]):  # (transformers picks the factors by the length it is given)
            with torch.no_grad():
                expected = hf(torch.tensor([row.prompt_ids + row.generated[:k]])).logits[0, -1]
            assert (actual - expected).abs().max().item() <= 1e-4, (len(row.prompt_ids), k)


def test_windowed_generation_past_the_window_matches_transformers(tmp_path):
    arch = dataclasses.replace(tiny_arch(vocab=TINY_VOCAB, architecture="Phi3ForCausalLM", sliding_window=WINDOW),
                               bos_token_id=1, eos_token_id=2)
    check_generation_matches_transformers(tmp_path, arch, ["Phi-3 says hello!", "Hi", "a window of eight"])


def test_customize_without_target_modules_trains_qkv_proj(tmp_path):
    """LoRA's default on a Phi checkpoint (``model=hf``): no config error, the adapter on qkv_proj, and the job's
    resolved config names it."""
    from nemo_customizer.api import customize

    arch = dataclasses.replace(tiny_arch(vocab=TINY_VOCAB, architecture="Phi3ForCausalLM"), bos_token_id=1,
                               eos_token_id=2)
    write_tiny_model_dir(tmp_path / "model", arch)
    write_classification_data(tmp_path / "data", n_train=16, n_val=2)
    result = customize("hf", dataset=str(tmp_path / "data"), output_dir=str(tmp_path / "job"), device="cpu",
                       progress_bar=False, model={"checkpoint": str(tmp_path / "model"), "max_seq_length": 64},
                       hyperparameters={"epochs": 1, "batch_size": 16, "micro_batch_size": 8, "max_steps": 1})
    assert result.steps == 1
    config = json.loads((tmp_path / "job/adapter/adapter_config.json").read_text())
    assert config["target_modules"] == ["qkv_proj"]
    from omegaconf import OmegaConf

    resolved = OmegaConf.load(tmp_path / "job/config.yaml")
    assert list(resolved.hyperparameters.lora.target_modules) == ["qkv_proj"]
