"""Composition: every shipped YAML composes, overrides apply, unknown keys are errors on every path."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from nemo_customizer.config import compose as compose_module
from nemo_customizer.config import (
    Config,
    ConfigError,
    available_models,
    compose_config,
    conf_dir,
    config_from_kwargs,
)
from nemo_customizer.config.schema import MISSING_PATH

SHIPPED = ["gemma-2-2b-it", "gemma-3-1b-it", "gemma-3-4b-it", "hf", "hf-llama", "llama-3.1-8b-instruct", "llama-3.1-nemotron-nano-8b-v1", "llama-3.2-1b-instruct",
           "llama-3.3-70b-instruct", "ministral-8b-instruct-2410", "mistral-7b-instruct-v0.3", "phi-3.5-mini-instruct",
           "phi-4", "qwen2.5-7b-instruct", "qwen3-0.6b", "qwen3-8b", "smollm2-135m-instruct", "tiny-llama-test"]


def test_conf_dir_is_found():
    assert (conf_dir() / "config.yaml").is_file()
    assert available_models() == SHIPPED


@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_model_composes(name):
    cfg = compose_config([f"model={name}"])
    assert isinstance(cfg, Config)
    assert cfg.model.name == name  # the YAML's name field matches its file name
    assert cfg.dataset.path == MISSING_PATH


def test_default_model_is_smollm2():
    cfg = compose_config([])
    assert cfg.model.name == "smollm2-135m-instruct"
    assert cfg.model.embedded == "smollm2-135m-instruct"
    assert cfg.model.max_seq_length == 2048


def test_overrides_take_effect():
    cfg = compose_config([
        "model=llama-3.2-1b-instruct", "dataset.path=/data/train.jsonl", "hyperparameters.epochs=5",
        "hyperparameters.lora.target_modules=[q_proj,k_proj,v_proj]", "hyperparameters.learning_rate=3e-4",
        "model.checkpoint=/ckpt", "model.architecture.rope_scaling.factor=16", "device=cpu",
    ])
    assert cfg.dataset.path == "/data/train.jsonl"
    assert cfg.hyperparameters.epochs == 5
    assert cfg.hyperparameters.lora.target_modules == ["q_proj", "k_proj", "v_proj"]
    assert cfg.hyperparameters.learning_rate == pytest.approx(3e-4)
    assert cfg.model.checkpoint == "/ckpt"
    assert cfg.model.architecture.rope_scaling.factor == 16.0
    assert cfg.device == "cpu"


@pytest.mark.parametrize("override, key, hint", [
    ("hyperparameters.lora.adaptr_dim=4", "hyperparameters.lora.adaptr_dim", "adapter_dim"),
    ("+hyperparameters.lora.adaptr_dim=4", "hyperparameters.lora.adaptr_dim", "adapter_dim"),
    ("++hyperparameters.epoch=4", "hyperparameters.epoch", "epochs"),
    ("hyperparamters.epochs=4", "hyperparamters.epochs", "hyperparameters"),
    ("model.architecture.hiden_size=4", "model.architecture.hiden_size", "hidden_size"),
])
def test_unknown_override_key_is_an_error(override, key, hint):
    with pytest.raises(ConfigError) as info:
        compose_config([override])
    message = str(info.value)
    assert repr(key) in message and hint in message and "valid keys" in message
    assert "\n" not in message


def test_override_below_a_value_is_an_error():
    with pytest.raises(ConfigError, match="'output_dir' is a value, not a section"):
        compose_config(["output_dir.sub=1"])


def test_ill_typed_override_names_the_key():
    with pytest.raises(ConfigError, match=r"hyperparameters\.epochs.*'many'"):
        compose_config(["hyperparameters.epochs=many"])


def test_unparsable_override():
    with pytest.raises(ConfigError, match="cannot parse override"):
        compose_config(["a=b=["])


def test_unknown_model_lists_available_models():
    with pytest.raises(ConfigError) as info:
        compose_config(["model=llama-3.2-1b"])
    message = str(info.value)
    assert "'llama-3.2-1b'" in message and "did you mean 'llama-3.2-1b-instruct'" in message
    for name in SHIPPED:
        assert name in message


def test_override_inside_null_section_is_explained():
    with pytest.raises(ConfigError, match="model.architecture.rope_scaling: it is null"):
        compose_config(["model.architecture.rope_scaling.factor=2"])  # SmolLM2 has no rope scaling


@pytest.fixture
def bad_conf(tmp_path, monkeypatch):
    """A copy of conf/ whose default model YAML the test can break."""
    copy = tmp_path / "conf"
    shutil.copytree(conf_dir(), copy)
    monkeypatch.setattr(compose_module, "conf_dir", lambda: copy)
    return copy / "model" / "smollm2-135m-instruct.yaml"


def test_unknown_key_in_yaml_is_an_error(bad_conf: Path):
    bad_conf.write_text(bad_conf.read_text().replace("  rope_theta:", "  rope_thetta: 1.0\n  rope_theta:"))
    with pytest.raises(ConfigError) as info:
        compose_config([])
    message = str(info.value)
    assert "'model.architecture.rope_thetta'" in message and "did you mean 'rope_theta'" in message
    assert "conf/model/smollm2-135m-instruct.yaml" in message


def test_ill_typed_value_in_yaml_is_an_error(bad_conf: Path):
    bad_conf.write_text(bad_conf.read_text().replace("max_seq_length: 2048", "max_seq_length: long"))
    with pytest.raises(ConfigError, match=r"model\.max_seq_length.*smollm2-135m-instruct\.yaml.*'long'"):
        compose_config([])


def test_kwargs_equal_overrides():
    path = "/data/my set, v2's \\ files\\"  # spaces, comma, quote and backslashes survive the quoting
    from_kwargs = config_from_kwargs(
        config="llama-3.2-1b-instruct",
        dataset=path,
        hyperparameters={"epochs": 2, "learning_rate": 5e-5, "lora": {"adapter_dim": 16,
                                                                       "target_modules": ["q_proj", "o_proj"]}},
        output_dir="out/job 1",
        model={"checkpoint": "/ckpt/llama", "tokenizer": None},
        device="cpu",
        progress_bar=False,
    )
    from_overrides = compose_config([
        "model=llama-3.2-1b-instruct", "dataset.path='/data/my set, v2\\'s \\ files\\\\'",
        "hyperparameters.epochs=2", "hyperparameters.learning_rate=5e-5", "hyperparameters.lora.adapter_dim=16",
        "hyperparameters.lora.target_modules=[q_proj,o_proj]", "output_dir='out/job 1'",
        "model.checkpoint=/ckpt/llama", "model.tokenizer=null", "device=cpu", "progress_bar=false",
    ])
    assert from_kwargs == from_overrides
    assert from_kwargs.dataset.path == path


def test_kwargs_defaults_equal_empty_overrides():
    assert config_from_kwargs() == compose_config([])


def test_kwargs_dataset_dict():
    cfg = config_from_kwargs(dataset={"path": "d.jsonl", "val_fraction": 0.2})
    assert (cfg.dataset.path, cfg.dataset.val_fraction) == ("d.jsonl", 0.2)


@pytest.mark.parametrize("kwargs, key", [
    ({"hyperparameters": {"lora": {"rank": 8}}}, "hyperparameters.lora.rank"),
    ({"hyperparameters": {"epoch": 1}}, "hyperparameters.epoch"),
    ({"learning_rate": 1e-4}, "learning_rate"),
    ({"model": {"checkpoint_dir": "/x"}}, "model.checkpoint_dir"),
])
def test_unknown_kwarg_gives_the_same_error_as_the_override(kwargs, key):
    with pytest.raises(ConfigError) as from_kwargs:
        config_from_kwargs(**kwargs)
    with pytest.raises(ConfigError) as from_override:
        compose_config([f"{key}=1"])
    assert str(from_kwargs.value) == str(from_override.value)
    assert repr(key) in str(from_kwargs.value)


def test_kwargs_unknown_model_and_model_string():
    with pytest.raises(ConfigError, match="available models"):
        config_from_kwargs(config="gpt-5")
    with pytest.raises(ConfigError, match="config='llama-3.2-1b-instruct'"):
        config_from_kwargs(model="llama-3.2-1b-instruct")


def test_existing_hydra_instance_is_restored(tmp_path):
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    (tmp_path / "app.yaml").write_text("x: 1\n")
    with initialize_config_dir(config_dir=str(tmp_path), version_base="1.3"):
        before = GlobalHydra.instance().hydra
        compose_config([])
        assert GlobalHydra.instance().hydra is before
