"""customize() with sequence packing on the tiny model: it trains, states the plan, and falls back when unsupported."""

import json

import pytest

from _tiny import write_classification_data, write_tiny_model_dir


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("packing_training")
    write_tiny_model_dir(root / "model")
    write_classification_data(root / "data", n_train=64, n_val=8)
    return root


def _customize(root, name, model_overrides=None):
    from nemo_customizer.api import customize

    return customize(
        "tiny-llama-test", dataset=str(root / "data"), output_dir=str(root / name), device="cpu", progress_bar=False,
        hyperparameters={"epochs": 2, "batch_size": 8, "micro_batch_size": 2, "learning_rate": 5e-3,
                         "sequence_packing_enabled": True, "lora": {"adapter_dropout": 0.0}},
        model={"checkpoint": str(root / "model"), "random_weights": False, **(model_overrides or {})},
    )


def _records(job) -> list:
    return [json.loads(line) for line in (job / "metrics.jsonl").read_text().splitlines()]


def test_packed_training_runs_and_logs_the_packing_plan(inputs, capfd):
    result = _customize(inputs, "packed")
    log = capfd.readouterr().err
    rows = _records(inputs / "packed")
    (plan,) = [r for r in rows if r["event"] == "packing"]
    assert plan["packing_factor"] > 2  # ~20-token rows in 128-token bins
    assert plan["batch_size"] == max(1, round(8 / plan["packing_factor"]))
    assert result.steps == 2 * plan["steps_per_epoch"] > 0
    assert plan["padding_after"] < plan["padding_before"]
    assert f"packing factor {plan['packing_factor']:.2f}" in log
    assert f"batch_size 8 examples -> {plan['batch_size']} bins per step" in log and "padding" in log
    train = [r for r in rows if r["event"] == "train"]
    assert len(train) == result.steps and train[-1]["loss"] < train[0]["loss"]
    # every step trains on about as many completion tokens as 8 unpacked rows (each row: label + EOS ~ 3 tokens)
    assert all(r["loss_tokens"] >= 8 for r in train)
    assert result.warnings == ()
    assert (inputs / "packed" / "adapter" / "adapter_model.safetensors").exists()


def test_model_without_packing_support_trains_unpacked_with_a_warning(inputs, capfd):
    result = _customize(inputs, "unsupported", {"sequence_packing_supported": False})
    log = capfd.readouterr().err
    assert len(result.warnings) == 1 and "does not support sequence packing" in result.warnings[0]
    assert f"warning: {result.warnings[0]}" in log
    rows = _records(inputs / "unsupported")
    assert not [r for r in rows if r["event"] == "packing"]
    assert result.steps == 2 * 64 // 8  # unpacked: 2 epochs of global batches of 8 examples
    assert json.loads((inputs / "unsupported" / "result.json").read_text())["warnings"] == list(result.warnings)
