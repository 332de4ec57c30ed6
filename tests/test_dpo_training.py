"""DPO jobs end to end through ``customize()`` on the tiny model: metrics and status add the rewards, validation
reports them on held-out pairs, early stopping on validation loss, LoRA / all_weights / packed, the adapter is
served like any other, and data of the wrong kind is refused."""

from __future__ import annotations

import json

import pytest

from _pairs import write_preference_data
from _tiny import write_classification_data, write_tiny_model_dir


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("dpo_training")
    write_tiny_model_dir(root / "model")
    write_classification_data(root / "data", n_train=32, n_val=8)  # the same rows as prompt/completion (SFT) data
    write_preference_data(root / "pairs", n_train=32, n_val=8)
    return root


def _customize(root, name, dataset="pairs", **hyperparameters):
    from nemo_customizer.api import customize

    settings = {"training_type": "dpo", "epochs": 2, "batch_size": 8, "micro_batch_size": 2, "learning_rate": 5e-3,
                "lora": {"adapter_dropout": 0.0}, "dpo": {"ref_policy_kl_penalty": 0.5}}
    for key, value in hyperparameters.items():
        settings[key] = {**settings[key], **value} if isinstance(value, dict) and key in settings else value
    return customize("tiny-llama-test", dataset=str(root / dataset), output_dir=str(root / name), device="cpu",
                     progress_bar=False, hyperparameters=settings,
                     model={"checkpoint": str(root / "model"), "random_weights": False})


def _records(job) -> list:
    return [json.loads(line) for line in (job / "metrics.jsonl").read_text().splitlines()]


REWARDS = ("rewards_chosen", "rewards_rejected", "reward_accuracy", "reward_margin")


def test_lora_dpo_job_trains_logs_rewards_and_serves_its_adapter(root, capfd):
    from nemo_customizer.api import generate
    from nemo_customizer.training.preference import REFERENCE_FILE

    result = _customize(root, "lora")
    log = capfd.readouterr().err
    job = root / "lora"
    rows = _records(job)
    train = [r for r in rows if r["event"] == "train"]
    validations = [r for r in rows if r["event"] == "validation"]
    assert result.steps == len(train) == 2 * 32 // 8
    assert all(r["pairs"] == 8 and "loss_tokens" not in r for r in train)
    assert all(set(REWARDS) <= r.keys() for r in train)
    assert train[0]["loss"] == pytest.approx(0.6931, abs=1e-3)  # policy == reference: -log sigmoid(0)
    assert train[0]["rewards_chosen"] == pytest.approx(0.0, abs=1e-4)
    assert train[-1]["loss"] < train[0]["loss"]
    assert all(r["reward_margin"] == pytest.approx(r["rewards_chosen"] - r["rewards_rejected"]) for r in train)
    assert all({f"val_{name}" for name in REWARDS} <= r.keys() for r in validations)
    assert validations[-1]["val_reward_margin"] > validations[0]["val_reward_margin"] > 0  # held-out pairs too
    assert 0 <= validations[-1]["val_reward_accuracy"] <= 1
    assert result.best_val_loss < 0.6931
    status = json.loads((job / "status.json").read_text())
    series = status["metrics"]["metrics"]
    assert status["metrics"]["keys"][:5] == ["train_loss", "val_loss", "lr", "grad_norm", "tokens_per_s"]
    for name in (*REWARDS, *(f"val_{n}" for n in REWARDS)):
        assert name in status["metrics"]["keys"] and len(series[name]) == len(
            train if not name.startswith("val_") else validations), name
    assert "reference log-probabilities: one forward pass over 32 training and 8 validation pairs (LoRA adapters " \
           "switched off)" in log
    assert "val_reward_accuracy" in log
    assert (job / REFERENCE_FILE).is_file()
    # the adapter is an HF PEFT adapter like an SFT job's: the generator serves it
    text = generate("yes a b\nAnswer: ", config="tiny-llama-test", adapter=result.adapter_path, max_tokens=3,
                    model={"checkpoint": str(root / "model"), "random_weights": False}, device="cpu")
    assert isinstance(text, str)


def test_all_weights_and_packed_dpo_jobs(root, capfd):
    full = _customize(root, "all_weights", finetuning_type="all_weights", learning_rate=1e-3, max_steps=3)
    assert full.steps == 3 and (root / "all_weights" / "model" / "model.safetensors").is_file()
    train = [r for r in _records(root / "all_weights") if r["event"] == "train"]
    assert train[0]["loss"] == pytest.approx(0.6931, abs=1e-3) and full.best_val_loss < 0.69

    packed = _customize(root, "packed", sequence_packing_enabled=True)
    log = capfd.readouterr().err
    rows = _records(root / "packed")
    (plan,) = [r for r in rows if r["event"] == "packing"]
    assert plan["packing_factor"] > 1 and f"batch_size 8 pairs -> {plan['batch_size']} bins per step" in log
    train = [r for r in rows if r["event"] == "train"]
    assert len(train) == packed.steps == 2 * plan["steps_per_epoch"]
    assert train[0]["loss"] == pytest.approx(0.6931, abs=1e-3) and packed.best_val_loss < 0.69


def test_dpo_early_stopping_on_validation_loss(root):
    result = _customize(root, "early", epochs=20, learning_rate=1e-12, val_check_interval=2,
                        early_stopping={"patience": 2, "min_delta": 0.001})
    assert result.stopped_early and result.steps == 6  # validations at 2 (best), 4, 6
    assert [r["step"] for r in _records(root / "early") if r["event"] == "validation"] == [2, 4, 6]


def test_data_of_the_wrong_kind_is_refused(root):
    from nemo_customizer.data import DatasetError

    with pytest.raises(DatasetError, match="training_type=dpo trains on preference pairs"):
        _customize(root, "dpo-on-sft-rows", dataset="data")
    with pytest.raises(DatasetError, match="are preference pairs .* train with hyperparameters.training_type=dpo"):
        _customize(root, "sft-on-pairs", training_type="sft", dpo={"ref_policy_kl_penalty": 0.05})
    assert not (root / "dpo-on-sft-rows").exists() and not (root / "sft-on-pairs").exists()
