"""A DPO job killed (SIGKILL, mid-checkpoint) resumes to the same per-step losses, rewards and weights as an
uninterrupted one: the reference log-probabilities are read back from the job directory, never recomputed from
trained weights."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from _multiproc import die_in_checkpoint_save, run_world
from _pairs import write_preference_data
from _tiny import write_tiny_model_dir

STEPS = 6  # 32 pairs / batch 8 = 4 steps per epoch: the kill (after step 4's checkpoint) falls in epoch 1
KILL_AT_SAVE = 3  # the third save (step 6) dies after writing its shards, before the rename


def _settings(root: str, name: str, finetuning: str) -> dict:
    return dict(
        config="tiny-llama-test", dataset=f"{root}/data", output_dir=f"{root}/{name}", device="cpu",
        progress_bar=False,
        hyperparameters={"training_type": "dpo", "finetuning_type": finetuning, "epochs": 2, "batch_size": 8,
                         "micro_batch_size": 2, "learning_rate": 3e-3, "max_steps": STEPS, "val_check_interval": 2,
                         # dropout draws random numbers: a resumed job matches only if the RNG state was restored
                         "lora": {"adapter_dropout": 0.1, "target_modules": ["q_proj", "v_proj", "down_proj"]},
                         "dpo": {"ref_policy_kl_penalty": 0.5}},
        model={"checkpoint": f"{root}/model", "random_weights": False},
    )


def _train(rank: int, root: str, name: str, finetuning: str, kill_at_save: int = 0) -> None:
    from nemo_customizer.api import customize

    if kill_at_save:
        die_in_checkpoint_save(kill_at_save)
    customize(**_settings(root, name, finetuning))


def _train_records(job: Path) -> dict:
    rows = [json.loads(line) for line in (job / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: (r["loss"], r["rewards_chosen"], r["rewards_rejected"]) for r in rows if r["event"] == "train"}


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("dpo_resume")
    write_tiny_model_dir(root / "model")
    write_preference_data(root / "data", n_train=32, n_val=8)
    return root


@pytest.mark.parametrize("finetuning", ["lora", "all_weights"])
def test_killed_dpo_job_resumes_to_the_same_losses_and_weights(root, finetuning, capfd):
    from nemo_customizer.training.preference import REFERENCE_FILE

    run_world(_train, 1, str(root), f"{finetuning}-ref", finetuning)
    with pytest.raises(Exception):  # the spawned process dies by SIGKILL
        run_world(_train, 1, str(root), f"{finetuning}-killed", finetuning, KILL_AT_SAVE)
    job = root / f"{finetuning}-killed"
    assert (job / "checkpoints" / "latest").read_text().strip() == "step_00000004"
    assert (job / REFERENCE_FILE).is_file()
    shutil.copytree(job, root / f"{finetuning}-no-reference")
    capfd.readouterr()
    run_world(_train, 1, str(root), f"{finetuning}-killed", finetuning)
    assert f"reference log-probabilities: read from {job / REFERENCE_FILE}" in capfd.readouterr().err

    expected, actual = _train_records(root / f"{finetuning}-ref"), _train_records(job)
    assert list(actual) == list(range(1, STEPS + 1))
    for step, values in expected.items():
        assert actual[step] == pytest.approx(values, abs=1e-6, rel=0), step
    export = "adapter/adapter_model.safetensors" if finetuning == "lora" else "model/model.safetensors"
    ours, ref = load_file(str(job / export)), load_file(str(root / f"{finetuning}-ref" / export))
    assert ours.keys() == ref.keys() and ref
    for key in ref:
        assert (ours[key] - ref[key]).abs().max().item() <= 1e-6, key
    assert json.loads((job / "status.json").read_text())["status"] == "completed"

    # Without its stored reference, a full fine-tune cannot resume (its weights are trained already); LoRA computes
    # the reference again with the adapters switched off, and gets the same values.
    (root / f"{finetuning}-no-reference" / REFERENCE_FILE).unlink()
    if finetuning == "all_weights":
        with pytest.raises(Exception, match="are trained already. Resume with the same data, or start a new "):
            run_world(_train, 1, str(root), f"{finetuning}-no-reference", finetuning)
    else:
        run_world(_train, 1, str(root), f"{finetuning}-no-reference", finetuning)
        recomputed = _train_records(root / f"{finetuning}-no-reference")
        for step, values in expected.items():
            assert recomputed[step] == pytest.approx(values, abs=1e-5, rel=0), step
        saved = [torch.load(root / name / REFERENCE_FILE) for name in (f"{finetuning}-ref",
                                                                      f"{finetuning}-no-reference")]
        torch.testing.assert_close(saved[0]["train"], saved[1]["train"], rtol=1e-6, atol=1e-6)
