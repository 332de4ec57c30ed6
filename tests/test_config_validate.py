"""Value checks: each mistake raises one ConfigError sentence naming the key."""

from __future__ import annotations

import warnings

import pytest

from nemo_customizer.config import ConfigError, ConfigWarning, check_batch_layout, compose_config, model_source
from nemo_customizer.config.validate import validate_config

BASE = ["model=tiny-llama-test", "dataset.path=data.jsonl"]


def _validate(*overrides: str, training: bool = True) -> None:
    validate_config(compose_config([*BASE, *overrides]), training=training)


@pytest.mark.parametrize("name", ["smollm2-135m-instruct", "tiny-llama-test"])
def test_shipped_defaults_are_valid(name):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        validate_config(compose_config([f"model={name}", "dataset.path=d.jsonl"]))


@pytest.mark.parametrize("name", ["llama-3.2-1b-instruct", "llama-3.1-8b-instruct", "llama-3.3-70b-instruct"])
def test_llama_models_are_valid_given_a_checkpoint(name):
    validate_config(compose_config([f"model={name}", "dataset.path=d.jsonl", "model.checkpoint=/ckpt"]))


@pytest.mark.parametrize("override, pattern", [
    ("hyperparameters.learning_rate=0", "hyperparameters.learning_rate must be greater than 0"),
    ("hyperparameters.learning_rate=-1e-4", "hyperparameters.learning_rate must be greater than 0"),
    ("hyperparameters.epochs=0", "hyperparameters.epochs must be at least 1"),
    ("hyperparameters.batch_size=0", "hyperparameters.batch_size must be at least 1"),
    ("hyperparameters.micro_batch_size=0", "hyperparameters.micro_batch_size must be at least 1"),
    ("hyperparameters.micro_batch_size=3", r"batch_size=16 is not a multiple of hyperparameters.micro_batch_size=3"),
    ("hyperparameters.lora.adapter_dim=0", "hyperparameters.lora.adapter_dim must be at least 1"),
    ("hyperparameters.lora.adapter_dropout=1.0", r"hyperparameters.lora.adapter_dropout must be in \[0, 1\)"),
    ("hyperparameters.lora.adapter_dropout=-0.1", r"hyperparameters.lora.adapter_dropout must be in \[0, 1\)"),
    ("hyperparameters.lora.alpha=0", "hyperparameters.lora.alpha must be greater than 0"),
    ("hyperparameters.lora.target_modules=[q_proj,qkv]", "unknown module 'qkv'.*linear_qkv"),
    ("hyperparameters.lora.target_modules=[]", "target_modules is empty"),
    ("hyperparameters.training_type=ppo", "hyperparameters.training_type='ppo' is not one of sft, dpo"),
    ("hyperparameters.finetuning_type=full", "finetuning_type.*full"),
    ("hyperparameters.finetuning_type=p_tuning", "finetuning_type='p_tuning' is not one of lora"),
    ("hyperparameters.warmup_steps=-1", "hyperparameters.warmup_steps must be at least 0"),
    ("hyperparameters.min_learning_rate=1e-3", "min_learning_rate=0.001 must be between 0 and"),
    ("hyperparameters.adam_beta2=1.0", r"hyperparameters.adam_beta2 must be in \[0, 1\)"),
    ("hyperparameters.max_steps=0", "hyperparameters.max_steps must be at least 1"),
    ("hyperparameters.early_stopping.patience=0", "hyperparameters.early_stopping.patience must be at least 1"),
    ("device=tpu", "device='tpu' is not one of auto, cpu, cuda"),
    ("precision=fp16", "precision='fp16' is not one of auto, fp32, bf16"),
    ("dataset.val_fraction=1.0", r"dataset.val_fraction must be in \[0, 1\)"),
    ("model.architecture.num_key_value_heads=3", "num_attention_heads=4 is not divisible by .*num_key_value_heads=3"),
    ("model.tensor_parallel_size=4", "model.tensor_parallel_size=4 does not divide .*num_key_value_heads=2"),
    ("model.tensor_parallel_size=3", "model.tensor_parallel_size=3 does not divide .*num_attention_heads=4"),
    ("model.use_sequence_parallel=true", "model.use_sequence_parallel=true needs model.tensor_parallel_size > 1"),
    ("model.attention_kernel=flash", "model.attention_kernel='flash' is not one of auto, torch, fa4"),
    ("hyperparameters.recompute_modules=[mlp,attention]",
     "hyperparameters.recompute_modules: 'attention' is not one of core_attn, mlp"),
    ("hyperparameters.recompute_modules=[mlp] hyperparameters.activation_checkpointing=true", "set one of them"),
    ("hyperparameters.recompute_modules=[mlp] hyperparameters.cuda_graphs=true "
     "hyperparameters.sequence_packing_enabled=true", "cuda_graphs=true and recompute_modules cannot be combined"),
    ("model.max_seq_length=4096", "model.max_seq_length=4096 exceeds .*max_position_embeddings=2048"),
    ("model.pipeline_parallel_size=3", "pipeline_parallel_size=3 does not divide"),
    ("model.checkpoint=/ckpt", "model.checkpoint and model.random_weights=true are both set"),
    ("model.random_weights=false", "has no weights: pass model.checkpoint="),
    # LlamaForCausalLM has no window in transformers: the export would attend to keys training did not see
    ("model.architecture.sliding_window=8",
     "model.architecture.sliding_window=8: LlamaForCausalLM has no sliding-window attention.*MistralForCausalLM"),
    ("model.architecture.architectures=[Phi3ForCausalLM] model.architecture.sliding_window=8 "
     "model.architecture.layer_types=[sliding_attention,full_attention]",
     "layer_types mixes windowed and full layers, but Phi3ForCausalLM windows every layer alike"),
])
def test_each_mistake_is_reported(override, pattern):
    with pytest.raises(ConfigError, match=pattern) as info:
        _validate(*override.split())  # some mistakes take two settings
    assert "\n" not in str(info.value)


def test_missing_dataset_path_is_reported_only_for_training():
    cfg = compose_config(["model=tiny-llama-test"])
    with pytest.raises(ConfigError, match="dataset.path is required"):
        validate_config(cfg)
    validate_config(cfg, training=False)


def test_sequence_packing_on_an_unsupported_model_is_not_a_config_error():
    # The job trains unpacked with a warning instead (tests/test_packing_training.py).
    _validate("hyperparameters.sequence_packing_enabled=true", "model.sequence_packing_supported=false")


def test_tp_with_sequence_parallel_is_valid():
    _validate("model.tensor_parallel_size=2", "model.use_sequence_parallel=true")


def test_batch_size_not_multiple_of_16_only_warns():
    with pytest.warns(ConfigWarning, match="batch_size=12 is not a multiple of 16"):
        _validate("hyperparameters.batch_size=12", "hyperparameters.micro_batch_size=4")


def test_windows_of_families_that_have_them_are_valid():
    _validate("model.architecture.architectures=[MistralForCausalLM]", "model.architecture.sliding_window=8")
    _validate("model.architecture.architectures=[Qwen2ForCausalLM]", "model.architecture.sliding_window=8",
              "model.architecture.layer_types=[full_attention,sliding_attention]")
    _validate("model.architecture.architectures=[Phi3ForCausalLM]", "model.architecture.sliding_window=8",
              "hyperparameters.lora.target_modules=[qkv_proj]")


def test_unset_lora_targets_are_the_familys_query_and_value_projections():
    from nemo_customizer.config.families import lora_targets

    llama = compose_config(BASE)
    assert llama.hyperparameters.lora.target_modules is None  # unset: filled in once the family is known
    validate_config(llama)
    assert lora_targets(None, ["LlamaForCausalLM"]) == ["q_proj", "v_proj"]
    assert lora_targets(None, ["Qwen3ForCausalLM"]) == ["q_proj", "v_proj"]
    assert lora_targets(None, ["Phi3ForCausalLM"]) == ["qkv_proj"]  # Phi-3's q, k and v are one HF module
    assert lora_targets(["o_proj"], ["Phi3ForCausalLM"]) == ["o_proj"]  # a list the user set stays as it is


def test_longrope_only_for_phi3_and_with_a_factor_per_frequency():
    from nemo_customizer.config.schema import ArchitectureConfig, RopeScalingConfig
    from nemo_customizer.config.validate import validate_architecture

    def arch(name, **rope):  # head_dim 16: 8 rotary frequencies
        return ArchitectureConfig(architectures=[name], rope_scaling=RopeScalingConfig(**{"rope_type": "longrope",
                                                                                          **rope}))

    good = dict(original_max_position_embeddings=32, short_factor=[1.0] * 8, long_factor=[2.0] * 8)
    validate_architecture(arch("Phi3ForCausalLM", **good))
    for name, rope, pattern in [
        ("LlamaForCausalLM", good, "rope_type='longrope' is not supported for LlamaForCausalLM.*Phi-3 only"),
        ("Phi3ForCausalLM", dict(rope_type="llama3"), "rope_type='llama3' is not supported for Phi3ForCausalLM; "
                                                      "use longrope"),
        ("Phi3ForCausalLM", {}, r"rope_scaling.short_factor must list 8 positive numbers .* got none.*model=hf"),
        ("Phi3ForCausalLM", dict(good, long_factor=[2.0] * 48), "long_factor must list 8 .* got 48 numbers"),
        ("Phi3ForCausalLM", dict(good, short_factor=[0.0] * 8), "short_factor must list 8 positive numbers"),
        ("Phi3ForCausalLM", dict(good, attention_factor=0.0), "attention_factor must be greater than 0"),
    ]:
        with pytest.raises(ConfigError, match=pattern):
            validate_architecture(arch(name, **rope))


def test_megatron_target_names_are_accepted():
    _validate("hyperparameters.lora.target_modules=[linear_qkv,linear_proj,linear_fc1,linear_fc2]")


def test_check_batch_layout():
    assert check_batch_layout(16, 2, 4) == 2
    assert check_batch_layout(16, 16, 1) == 1
    with pytest.raises(ConfigError, match=r"micro_batch_size=2 × data-parallel size 3 = 6; .*multiple of 6"):
        check_batch_layout(16, 2, 3)
    with pytest.raises(ConfigError, match="at least 1"):
        check_batch_layout(16, 0, 1)


def test_model_source_precedence():
    model = compose_config(["model=smollm2-135m-instruct"]).model
    assert model_source(model) == ("embedded", "smollm2-135m-instruct")
    model.checkpoint = "/ckpt"
    assert model_source(model) == ("checkpoint", "/ckpt")  # checkpoint wins over embedded
    model.checkpoint, model.random_weights = None, True
    assert model_source(model) == ("random", None)
    llama = compose_config(["model=llama-3.2-1b-instruct"]).model
    with pytest.raises(ConfigError, match="llama-3.2-1b-instruct has no weights"):
        model_source(llama)


def test_parallel_layout_checked_against_the_launched_processes():
    from nemo_customizer.config.validate import check_parallel_layout

    cfg = compose_config(["model=llama-3.1-8b-instruct", "model.tensor_parallel_size=2",
                          "hyperparameters.batch_size=16", "hyperparameters.micro_batch_size=2"])
    assert check_parallel_layout(cfg.model, cfg.hyperparameters, world_size=8) == 4
    with pytest.raises(ConfigError, match="3 processes cannot be split into model.tensor_parallel_size=2"):
        check_parallel_layout(cfg.model, cfg.hyperparameters, world_size=3)
    with pytest.raises(ConfigError, match="larger than the 1 processes"):
        check_parallel_layout(cfg.model, cfg.hyperparameters, world_size=2, local_world_size=1)
    with pytest.raises(ConfigError, match=r"batch_size=16 is not a multiple of .*micro_batch_size=2 × data-parallel "
                                          r"size 16 = 32"):
        check_parallel_layout(cfg.model, cfg.hyperparameters, world_size=32)
