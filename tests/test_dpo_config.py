"""``training_type: dpo`` settings: the product's names and defaults, and each mistake a ConfigError naming its key
before any data is read."""

from __future__ import annotations

import pytest

from nemo_customizer.config import ConfigError, DpoConfig, compose_config
from nemo_customizer.config.validate import validate_config

BASE = ["model=tiny-llama-test", "dataset.path=data.jsonl"]
DPO = [*BASE, "hyperparameters.training_type=dpo"]


def test_defaults_are_the_products():
    cfg = compose_config(DPO)
    validate_config(cfg)
    assert cfg.hyperparameters.dpo == DpoConfig(ref_policy_kl_penalty=0.05, preference_loss_weight=1.0,
                                                preference_average_log_probs=False, sft_loss_weight=0.0,
                                                sft_average_log_probs=False)


def test_settings_compose_from_overrides_and_kwargs():
    from nemo_customizer.config import config_from_kwargs

    cfg = config_from_kwargs(config="tiny-llama-test", dataset="d.jsonl", hyperparameters={
        "training_type": "dpo", "finetuning_type": "all_weights",
        "dpo": {"ref_policy_kl_penalty": 0.2, "sft_loss_weight": 0.5, "preference_average_log_probs": True}})
    validate_config(cfg)
    assert (cfg.hyperparameters.dpo.ref_policy_kl_penalty, cfg.hyperparameters.dpo.sft_loss_weight) == (0.2, 0.5)
    assert cfg.hyperparameters.dpo.preference_average_log_probs is True
    with pytest.raises(ConfigError, match="dpo.*beta"):  # an unknown key names the known ones
        config_from_kwargs(config="tiny-llama-test", dataset="d.jsonl", hyperparameters={"dpo": {"beta": 0.1}})


@pytest.mark.parametrize("overrides, pattern", [
    (["hyperparameters.dpo.ref_policy_kl_penalty=0"], "hyperparameters.dpo.ref_policy_kl_penalty must be greater "
                                                      "than 0, got 0"),
    (["hyperparameters.dpo.ref_policy_kl_penalty=-0.1"], "hyperparameters.dpo.ref_policy_kl_penalty must be greater"),
    (["hyperparameters.dpo.preference_loss_weight=-1"], "hyperparameters.dpo.preference_loss_weight must be 0 or more"),
    (["hyperparameters.dpo.sft_loss_weight=-0.5"], "hyperparameters.dpo.sft_loss_weight must be 0 or more"),
    (["hyperparameters.dpo.preference_loss_weight=0"], "preference_loss_weight and sft_loss_weight are both 0"),
    (["hyperparameters.cuda_graphs=true", "hyperparameters.sequence_packing_enabled=true"],
     "hyperparameters.cuda_graphs=true replays supervised .* set cuda_graphs=false with training_type=dpo"),
    (["evaluation.enabled=true"], "evaluation.enabled=true with hyperparameters.training_type=dpo needs "
                                  "evaluation.dataset"),
])
def test_each_dpo_mistake_names_its_key(overrides, pattern):
    with pytest.raises(ConfigError, match=pattern) as info:
        validate_config(compose_config([*DPO, *overrides]))
    assert "\n" not in str(info.value)


def test_dpo_settings_without_training_type_dpo_are_refused():
    with pytest.raises(ConfigError, match=r"hyperparameters.dpo.sft_loss_weight is set but "
                                          r"hyperparameters.training_type='sft'; set training_type=dpo"):
        validate_config(compose_config([*BASE, "hyperparameters.dpo.sft_loss_weight=0.1"]))
    validate_config(compose_config([*DPO, "evaluation.enabled=true", "evaluation.dataset=heldout.jsonl"]))


def test_bad_dpo_settings_fail_before_any_data_is_read(tmp_path):
    """customize() refuses the config before it looks at the dataset (which does not exist here) or makes a job."""
    from nemo_customizer.api import customize

    with pytest.raises(ConfigError, match="ref_policy_kl_penalty"):
        customize("tiny-llama-test", dataset=str(tmp_path / "missing"), output_dir=str(tmp_path / "job"),
                  hyperparameters={"training_type": "dpo", "dpo": {"ref_policy_kl_penalty": -1.0}})
    assert not (tmp_path / "job").exists()
