"""The training loop on a tiny model: early stopping, best checkpoint, job files."""

import pytest

from _tiny import write_classification_data, write_tiny_model_dir


def test_early_stopping_ends_training_and_keeps_the_best_adapter(tmp_path):
    """With a negligible learning rate, validation never improves: training stops after `patience` validations."""
    import json

    from nemo_customizer.api import customize

    write_tiny_model_dir(tmp_path / "model")
    write_classification_data(tmp_path / "data", n_train=32, n_val=8)
    result = customize(
        "tiny-llama-test", dataset=str(tmp_path / "data"), output_dir=str(tmp_path / "job"), progress_bar=False,
        hyperparameters={"epochs": 20, "batch_size": 8, "micro_batch_size": 8, "learning_rate": 1e-12,
                         "min_learning_rate": 0.0, "val_check_interval": 2,
                         "early_stopping": {"patience": 3, "min_delta": 0.001}},
        model={"checkpoint": str(tmp_path / "model"), "random_weights": False},
    )
    assert result.stopped_early
    assert result.steps == 8  # validations at steps 2 (best), 4, 6, 8 (third without improvement)
    assert result.best_step == 2 and result.best_epoch == 0
    assert result.epochs_completed == 2  # step 8 ends epoch 1: counted, as status.json counts it
    assert json.loads((tmp_path / "job" / "status.json").read_text())["epochs_completed"] == 2
    rows = [json.loads(line) for line in (tmp_path / "job" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["event"] == "validation"] == [2, 4, 6, 8]
    assert (tmp_path / "job" / "adapter" / "adapter_model.safetensors").exists()
    assert json.loads((tmp_path / "job" / "result.json").read_text())["stopped_early"] is True


def test_customize_trains_on_a_stored_dataset_name(tmp_path):
    from nemo_customizer import datasets
    from nemo_customizer.api import customize

    write_tiny_model_dir(tmp_path / "model")
    write_classification_data(tmp_path / "data", n_train=16, n_val=4)
    model = {"checkpoint": str(tmp_path / "model"), "random_weights": False}
    datasets.upload(tmp_path / "data", "yes-no", model="tiny-llama-test", store_dir=tmp_path / "store",
                    model_overrides=model)
    result = customize("tiny-llama-test", dataset={"path": "yes-no", "store_dir": str(tmp_path / "store")},
                       output_dir=str(tmp_path / "job"), progress_bar=False,
                       hyperparameters={"epochs": 1, "batch_size": 8, "micro_batch_size": 8}, model=model)
    assert result.steps == 2


def test_hf_llama_takes_the_architecture_from_any_checkpoint(tmp_path):
    """model=hf-llama trains a checkpoint whose architecture no shipped YAML describes."""
    import dataclasses

    from _tiny import tiny_arch

    from nemo_customizer.api import customize
    from nemo_customizer.config import ConfigError, compose_config, validate_config

    arch = dataclasses.replace(tiny_arch(vocab=320, layers=3, hidden=96, heads=6, kv_heads=3),
                               max_position_embeddings=512)
    write_tiny_model_dir(tmp_path / "model", arch)
    write_classification_data(tmp_path / "data", n_train=16, n_val=4)
    result = customize("hf-llama", dataset=str(tmp_path / "data"), output_dir=str(tmp_path / "job"),
                       progress_bar=False, model={"checkpoint": str(tmp_path / "model"), "max_seq_length": 256},
                       hyperparameters={"epochs": 1, "batch_size": 8, "micro_batch_size": 8})
    assert result.steps == 2
    # q (96→96) and v (96→48) adapters, r=8, in 3 layers: the checkpoint's shapes, not the YAML defaults
    assert result.trainable_parameters == 3 * (8 * 96 + 96 * 8 + 8 * 96 + 48 * 8)
    with pytest.raises(ConfigError, match="model hf-llama has no weights: pass model.checkpoint"):
        validate_config(compose_config(["model=hf-llama", "dataset.path=x.jsonl"]))
    with pytest.raises(ConfigError, match="takes its architecture from the checkpoint"):
        validate_config(compose_config(["model=hf-llama", "model.random_weights=true", "dataset.path=x.jsonl"]))
    with pytest.raises(ConfigError, match="max_seq_length=4096 exceeds the model's max_position_embeddings=512"):
        customize("hf-llama", dataset=str(tmp_path / "data"), output_dir=str(tmp_path / "job2"),
                  model={"checkpoint": str(tmp_path / "model")})


@pytest.mark.parametrize("overlap", [True, False])
def test_the_next_step_is_queued_before_a_step_is_read(tmp_path, monkeypatch, overlap):
    """On GPUs the loop reads step N after queuing step N+1, except before a validation, an epoch's end or the job's
    end (on a CPU it reads each step at once). What it reads later equals what step N gave when queued (nothing of
    N+1 overwrote it), each validation sees exactly the steps read so far, and the learning rate follows the
    schedule one step at a time."""
    import json

    from nemo_customizer.api import customize
    from nemo_customizer.training import loop, pipelined
    from nemo_customizer.training.step import QueuedStep

    events, eager, numbers = [], {}, {}  # numbers: id of a QueuedStep -> its step

    def queue_step(*args, **kwargs):
        queued = real_queue(*args, **kwargs)
        step = len(eager) + 1
        eager[step], numbers[id(queued)] = queued.numbers.tolist(), step  # before step N+1 exists
        events.append(("queue", step))
        return queued

    def result(queued):
        assert queued.numbers.tolist() == eager[numbers[id(queued)]]
        events.append(("read", numbers[id(queued)]))
        return real_result(queued)

    def validate(job, state):
        assert max(s for kind, s in events if kind == "queue") == state.steps
        assert max(s for kind, s in events if kind == "read") == state.steps
        events.append(("validate", state.steps))
        real_validate(job, state)

    real_queue, real_result, real_validate = loop.queue_step, QueuedStep.result, loop._validate
    monkeypatch.setattr(pipelined, "overlaps", lambda device: overlap)  # True: as on a GPU
    monkeypatch.setattr(loop, "queue_step", queue_step)
    monkeypatch.setattr(QueuedStep, "result", result)
    monkeypatch.setattr(loop, "_validate", validate)
    write_tiny_model_dir(tmp_path / "model")
    write_classification_data(tmp_path / "data", n_train=40, n_val=8)
    result = customize(  # 5 steps per epoch, 3 epochs capped at 8 steps, validation every 3 steps
        "tiny-llama-test", dataset=str(tmp_path / "data"), output_dir=str(tmp_path / "job"), progress_bar=False,
        hyperparameters={"epochs": 3, "batch_size": 8, "micro_batch_size": 4, "max_steps": 8, "val_check_interval": 3,
                         "learning_rate": 1e-3, "warmup_steps": 4, "early_stopping": {"patience": 100}},
        model={"checkpoint": str(tmp_path / "model"), "random_weights": False},
    )
    assert result.steps == 8
    if overlap:
        assert events == [("queue", 1), ("queue", 2), ("read", 1), ("queue", 3), ("read", 2), ("read", 3),
                          ("validate", 3), ("queue", 4), ("queue", 5), ("read", 4), ("read", 5),  # 5: epoch 0's end
                          ("validate", 5), ("queue", 6), ("read", 6), ("validate", 6), ("queue", 7), ("queue", 8),
                          ("read", 7), ("read", 8), ("validate", 8)]
    else:
        validations = {3: [("validate", 3)], 5: [("validate", 5)], 6: [("validate", 6)], 8: [("validate", 8)]}
        assert events == [e for s in range(1, 9) for e in [("queue", s), ("read", s)] + validations.get(s, [])]
    rows = [json.loads(line) for line in (tmp_path / "job" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["event"] == "train"]
    assert [r["step"] for r in train] == list(range(1, 9)) and [r["epoch"] for r in train] == [0] * 5 + [1] * 3
    validations = [r for r in rows if r["event"] == "validation"]  # the last one judges step 8, of epoch 1
    assert [(r["step"], r["epoch"]) for r in validations] == [(3, 0), (5, 0), (6, 1), (8, 1)]
    assert [r["loss"] for r in train] == [eager[s][0] / eager[s][1] for s in range(1, 9)]
    lrs = [r["lr"] for r in train]  # one schedule step per training step: linear warm-up over 4, then cosine decay
    assert lrs[:5] == pytest.approx([0.0, 2.5e-4, 5e-4, 7.5e-4, 1e-3])
    assert lrs[4] > lrs[5] > lrs[6] > lrs[7]
    assert all(r["tokens_per_s"] > 0 for r in train)
