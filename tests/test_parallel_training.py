"""TP=2, TP=2+SP and DP=2 training on CPU over gloo give the same losses as one process."""

import json
from pathlib import Path

import pytest

from _multiproc import run_world
from _tiny import write_classification_data, write_tiny_model_dir

STEPS = 4


def _train(rank: int, root: str, name: str, tp: int, sp: bool) -> None:
    from nemo_customizer.api import customize

    customize(
        "tiny-llama-test", dataset=f"{root}/data", output_dir=f"{root}/{name}", device="cpu", progress_bar=False,
        hyperparameters={"epochs": 1, "batch_size": 8, "micro_batch_size": 2, "learning_rate": 5e-3,
                         "max_steps": STEPS, "lora": {"adapter_dropout": 0.0, "target_modules": ["q_proj", "v_proj",
                                                                                                 "o_proj", "down_proj",
                                                                                                 "gate_proj"]}},
        model={"checkpoint": f"{root}/model", "random_weights": False, "tensor_parallel_size": tp,
               "use_sequence_parallel": sp},
    )


def _losses(job: Path) -> list:
    rows = [json.loads(line) for line in (job / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if r["event"] == "train"] + [r["val_loss"] for r in rows if r["event"] == "validation"]


def _accuracies(job: Path) -> list:
    rows = [json.loads(line) for line in (job / "metrics.jsonl").read_text().splitlines()]
    return [r["val_mean_token_accuracy"] for r in rows if r["event"] == "validation"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    root = tmp_path_factory.mktemp("parallel")
    write_tiny_model_dir(root / "model")
    write_classification_data(root / "data", n_train=48, n_val=8)
    run_world(_train, 1, str(root), "single", 1, False)
    return root, _losses(root / "single")


@pytest.mark.parametrize("name,world,tp,sp", [("tp2", 2, 2, False), ("tp2sp", 2, 2, True), ("dp2", 2, 1, False)])
def test_parallel_losses_match_single_process(reference, name, world, tp, sp):
    root, expected = reference
    run_world(_train, world, str(root), name, tp, sp)
    actual = _losses(root / name)
    assert len(actual) == len(expected) == STEPS + 1
    assert actual == pytest.approx(expected, abs=1e-4)
    assert expected[STEPS - 1] < expected[0]  # it trained
    # validation token accuracy: hits summed over micro batches and DP ranks, the argmax taken over TP's shards
    assert _accuracies(root / name) == _accuracies(root / "single")
    counts = [{k: json.loads((root / job / "result.json").read_text())[k]
               for k in ("trainable_parameters", "total_parameters")} for job in (name, "single")]
    assert counts[0] == counts[1]  # the whole model's counts, not this rank's shard
    # the exported adapter is the same full (unsharded) adapter
    from safetensors.torch import load_file

    ours, ref = load_file(str(root / name / "adapter/adapter_model.safetensors")), \
        load_file(str(root / "single/adapter/adapter_model.safetensors"))
    assert ours.keys() == ref.keys()
    for key in ref:
        assert (ours[key] - ref[key]).abs().max().item() < 1e-4, key



def _adapter_logits(rank: int, root: str, tp: int, out: str) -> None:
    """Load the single-process adapter into a TP-sharded model and save the gathered logits (rank 0)."""
    import torch

    from nemo_customizer.config import LoraConfig
    from nemo_customizer.models.gpt import forward_logits
    from nemo_customizer.config import compose_config
    from nemo_customizer.peft.apply import apply_lora
    from nemo_customizer.peft.export import load_peft_adapter
    from nemo_customizer.training.session import TrainingSession

    cfg = compose_config(["model=tiny-llama-test", f"model.tensor_parallel_size={tp}", "device=cpu",
                          "precision=fp32", "hyperparameters.seed=0"])
    with TrainingSession(cfg, checkpoint_dir=Path(root) / "model") as session:
        model = session.build_model(trainable=False)
        apply_lora(model, cfg.model.architecture, LoraConfig(adapter_dropout=0.0, target_modules=[
            "q_proj", "v_proj", "o_proj", "down_proj", "gate_proj"]), seed=123)
        load_peft_adapter(model, Path(root) / "single" / "adapter")
        tokens = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            logits = forward_logits(model.eval(), tokens)
        if rank == 0:
            torch.save(logits, out)


def test_adapter_loads_into_tensor_parallel_model(reference):
    import torch

    root, _ = reference
    run_world(_adapter_logits, 1, str(root), 1, str(root / "logits_tp1.pt"))
    run_world(_adapter_logits, 2, str(root), 2, str(root / "logits_tp2.pt"))
    tp1, tp2 = torch.load(root / "logits_tp1.pt"), torch.load(root / "logits_tp2.pt")
    assert tp1.shape == tp2.shape == (2, 24, 320)
    assert (tp1 - tp2).abs().max().item() <= 1e-4


def _settings(root, name: str, tp: int) -> dict:
    return dict(
        config="tiny-llama-test", dataset=f"{root}/data", output_dir=f"{root}/{name}", device="cpu", progress_bar=False,
        hyperparameters={"epochs": 1, "batch_size": 8, "micro_batch_size": 2, "learning_rate": 5e-3,
                         "max_steps": STEPS, "lora": {"adapter_dropout": 0.0, "target_modules": ["q_proj", "v_proj",
                                                                                                 "o_proj", "down_proj",
                                                                                                 "gate_proj"]}},
        model={"checkpoint": f"{root}/model", "random_weights": False, "tensor_parallel_size": tp},
    )


def test_customize_with_num_gpus_spawns_the_workers_itself(reference):
    """customize(num_gpus=2) from one Python process equals torchrun with 2 processes (here: TP=2 on CPU)."""
    from nemo_customizer.api import customize

    root, expected = reference
    result = customize(**_settings(root, "spawned-tp2", 2), num_gpus=2)
    assert result.steps == STEPS and result.job_dir == str(root / "spawned-tp2")
    assert _losses(root / "spawned-tp2") == pytest.approx(expected, abs=1e-4)


def test_num_gpus_errors_come_back_to_the_caller(reference):
    from nemo_customizer.api import customize
    from nemo_customizer.config import ConfigError
    from nemo_customizer.data import DatasetError

    root, _ = reference
    with pytest.raises(ConfigError, match="3 processes cannot be split"):  # checked before any process starts
        customize(**_settings(root, "bad-layout", 2), num_gpus=3)
    assert not (root / "bad-layout").exists()
    (root / "tiny-data").mkdir()
    (root / "tiny-data/training.jsonl").write_text('{"prompt": "a", "completion": "b"}\n')
    settings = _settings(root, "bad-data", 1)
    settings["dataset"] = str(root / "tiny-data")
    with pytest.raises(DatasetError, match="fewer than"):  # raised in a worker, re-raised here as itself
        customize(**settings, num_gpus=2)


def test_short_rows_packed_at_two_data_parallel_ranks_keep_the_unpacked_steps(reference):
    """16 short rows, batch 16, two data-parallel ranks: one full-length bin would hold every row (a step of two
    bins could not be formed); bins shrink to 8 rows, one per rank, and an epoch is one step, as unpacked."""
    from nemo_customizer.api import customize

    root, _ = reference
    (root / "short-data").mkdir()
    (root / "short-data/training.jsonl").write_text(''.join(
        f'{{"prompt": "p{i}", "completion": "c"}}\n' for i in range(16)))
    (root / "short-data/validation.jsonl").write_text('{"prompt": "p", "completion": "c"}\n' * 2)
    settings = _settings(root, "short-packed", 1)
    settings["dataset"] = str(root / "short-data")
    settings["hyperparameters"].update(batch_size=16, epochs=2, max_steps=None, sequence_packing_enabled=True)
    settings["model"]["max_seq_length"] = 1024
    result = customize(**settings, num_gpus=2)
    assert result.steps == 2
    records = [json.loads(line) for line in (root / "short-packed/metrics.jsonl").read_text().splitlines()]
    (plan,) = [r for r in records if r["event"] == "packing"]
    assert (plan["bins"], plan["batch_size"], plan["packing_factor"]) == (2, 2, 8.0)
    assert plan["steps_per_epoch"] == plan["requested_steps_per_epoch"] == 1
    assert plan["tokens_per_step"] == pytest.approx(plan["requested_tokens_per_step"])
    assert plan["bin_capacity"] < 1024
