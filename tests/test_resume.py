"""Resumable checkpoints: a killed job resumes to the same result; a TP=2 checkpoint resumes and exports at TP=1."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from _multiproc import die_in_checkpoint_save, run_world
from _tiny import write_classification_data, write_tiny_model_dir

STEPS = 8  # 48 rows / batch 8 = 6 steps per epoch: the kill (after step 4's checkpoint) is mid-epoch 0
KILL_AT_SAVE = 3  # the third checkpoint save (step 6) is killed after its shards are written, before the rename


def _settings(root: str, name: str, finetuning: str, tp: int, dropout: float = 0.1) -> dict:
    # "all_weights-bf16": bf16 weights updated in place (no fp32 master copy), stochastically rounded: the rounding
    # draws random numbers, so a resumed job matches only if the checkpoint restored the generator too.
    bf16 = finetuning.endswith("-bf16")
    return dict(
        config="tiny-llama-test", dataset=f"{root}/data", output_dir=f"{root}/{name}", device="cpu",
        progress_bar=False, precision="bf16" if bf16 else "auto",
        hyperparameters={"finetuning_type": finetuning.removesuffix("-bf16"), "epochs": 2, "batch_size": 8,
                         "micro_batch_size": 2, "learning_rate": 3e-3, "max_steps": STEPS, "val_check_interval": 2,
                         "fp32_master_weights": not bf16,
                         "lora": {"adapter_dropout": dropout, "target_modules": ["q_proj", "v_proj", "down_proj"]}},
        model={"checkpoint": f"{root}/model", "random_weights": False, "tensor_parallel_size": tp},
    )


def _train(rank: int, root: str, name: str, finetuning: str, tp: int, kill_at_save: int = 0,
           dropout: float = 0.1, settings: dict | None = None) -> None:
    from nemo_customizer.api import customize

    if kill_at_save:
        die_in_checkpoint_save(kill_at_save)
    customize(**(settings or _settings(root, name, finetuning, tp, dropout)))


def _export(rank: int, job: str, out: str, tp: int) -> None:
    from nemo_customizer.export import export_checkpoint

    export_checkpoint(job, out, overrides=[f"model.tensor_parallel_size={tp}"])


def _train_losses(job: Path) -> dict:
    rows = [json.loads(line) for line in (job / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows if r["event"] == "train"]
    assert steps == sorted(set(steps)), "each step is logged once, also after a resume"
    return {r["step"]: r["loss"] for r in rows if r["event"] == "train"}


def _weights(job: Path, finetuning: str) -> dict:
    return load_file(str(job / ("adapter/adapter_model.safetensors" if finetuning == "lora" else
                                "model/model.safetensors")))


def _kill_then_resume(root: Path, name: str, finetuning: str, tp_before: int, tp_after: int) -> Path:
    with pytest.raises(Exception):  # the spawned processes die by SIGKILL
        run_world(_train, tp_before, str(root), name, finetuning, tp_before, KILL_AT_SAVE)
    job = root / name
    checkpoints = job / "checkpoints"
    assert (checkpoints / "latest").read_text().strip() == "step_00000004"
    assert sorted(p.name for p in checkpoints.iterdir()) == [".tmp-step_00000006", "latest", "step_00000004"]
    assert not (job / "result.json").exists()
    run_world(_train, tp_after, str(root), name, finetuning, tp_after)
    return job


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    write_tiny_model_dir(root / "model")
    write_classification_data(root / "data", n_train=48, n_val=8)
    return root


@pytest.mark.parametrize("finetuning", ["lora", "all_weights", "all_weights-bf16"])
def test_killed_job_resumes_to_the_same_losses_and_weights(root, finetuning):
    run_world(_train, 1, str(root), f"{finetuning}-ref", finetuning, 1)
    reference = root / f"{finetuning}-ref"
    job = _kill_then_resume(root, f"{finetuning}-killed", finetuning, 1, 1)

    expected, actual = _train_losses(reference), _train_losses(job)
    assert list(actual) == list(range(1, STEPS + 1))
    assert actual == pytest.approx(expected, abs=1e-6, rel=0)
    assert expected[STEPS] < expected[1]  # it trained
    ref_weights, weights = _weights(reference, finetuning), _weights(job, finetuning)
    assert weights.keys() == ref_weights.keys()
    for key in ref_weights:
        assert torch.equal(weights[key], ref_weights[key]) or \
            (weights[key] - ref_weights[key]).abs().max().item() <= 1e-6, key
    # the interrupted save was cleaned up; only the newest checkpoint is kept
    assert sorted(p.name for p in (job / "checkpoints").iterdir()) == ["latest", f"step_{STEPS:08d}"]
    assert json.loads((job / "status.json").read_text())["status"] == "completed"
    result = json.loads((job / "result.json").read_text())
    assert result["steps"] == STEPS


def test_tensor_parallel_checkpoint_exports_and_resumes_at_tp1(root):
    # no dropout: its masks come from each rank's RNG, which a run at another layout cannot restore
    run_world(_train, 1, str(root), "tp1-ref", "lora", 1, 0, 0.0)
    with pytest.raises(Exception):
        run_world(_train, 2, str(root), "tp2-killed", "lora", 2, KILL_AT_SAVE, 0.0)
    job = root / "tp2-killed"

    # the TP=2 checkpoint of step 4 exports the same adapter at TP=1 and TP=2
    # (at TP=1 with the command line a user would type)
    subprocess.run([sys.executable, "-m", "nemo_customizer", "export", str(job), "--output", str(root / "export-tp1"),
                    "model.tensor_parallel_size=1"], check=True, cwd=Path(__file__).resolve().parents[1],
                   env={**os.environ, "OMP_NUM_THREADS": "1"})
    run_world(_export, 2, str(job), str(root / "export-tp2"), 2)
    at_tp1 = load_file(str(root / "export-tp1/adapter/adapter_model.safetensors"))
    at_tp2 = load_file(str(root / "export-tp2/adapter/adapter_model.safetensors"))
    assert at_tp1.keys() == at_tp2.keys() and at_tp1
    for key in at_tp1:
        assert (at_tp1[key] - at_tp2[key]).abs().max().item() <= 1e-6, key

    # resumed at TP=1, it continues like a TP=1 run
    run_world(_train, 1, str(root), "tp2-killed", "lora", 1, 0, 0.0)
    expected, actual = _train_losses(root / "tp1-ref"), _train_losses(job)
    assert list(actual) == list(range(1, STEPS + 1))
    assert actual == pytest.approx(expected, abs=1e-4, rel=0)


def test_a_job_resumes_only_with_the_same_settings(root):
    from nemo_customizer.api import customize

    if not (root / "lora-ref/result.json").exists():
        run_world(_train, 1, str(root), "lora-ref", "lora", 1)
    with pytest.raises(FileExistsError, match="finished job"):
        customize(**_settings(str(root), "lora-ref", "lora", 1))
    (root / "unfinished").mkdir()
    (root / "unfinished/config.yaml").write_text((root / "lora-ref/config.yaml").read_text())
    settings = _settings(str(root), "unfinished", "lora", 1)
    settings["hyperparameters"]["learning_rate"] = 1e-3
    with pytest.raises(FileExistsError, match=r"hyperparameters.learning_rate: 0.003 -> 0.001"):
        customize(**settings)


def test_a_script_without_a_main_guard_saves_checkpoints(root, tmp_path):
    """mcore's checkpoint writer would start a spawn-context Manager, which re-runs an unguarded __main__ script."""
    settings = _settings(str(root), "unguarded", "lora", 1)
    settings["hyperparameters"]["max_steps"] = 2
    script = tmp_path / "train.py"
    script.write_text(f"from nemo_customizer import customize\nresult = customize(**{settings!r})\n"
                      "print('steps', result.steps)\n")
    repo = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, cwd=tmp_path,
                          env={**os.environ, "OMP_NUM_THREADS": "1",
                               "PYTHONPATH": os.pathsep.join([str(repo), os.environ.get("PYTHONPATH", "")])})
    assert done.returncode == 0, done.stderr[-2000:]
    assert "steps 2" in done.stdout
    assert (root / "unguarded/checkpoints/latest").read_text().strip() == "step_00000002"


def _distributed_optimizer_job(rank: int, root: str, name: str, kill_at_save: int, tp: int = 1) -> None:
    """A full fine-tune with mcore's distributed optimizer, on CPU.

    The library refuses the distributed optimizer on CPU (mcore's checks want CUDA tensors). This harness lifts
    that: it tells mcore's type checks that CPU tensors are CUDA ones, makes ``.cuda()`` a no-op and skips the
    refusal. What runs is mcore's real sharding, saving and loading, which our checkpoint code must drive right.
    """
    import importlib

    from nemo_customizer import api
    from nemo_customizer.compat import CudaToCpuTorch, megatron_cpu

    enter = megatron_cpu.enter_cpu_adaptations

    def enter_with_distributed_optimizer():
        hold = enter()
        proxy = CudaToCpuTorch()
        for module in ("megatron.core.optimizer.distrib_optimizer",
                       "megatron.core.distributed.distributed_data_parallel"):
            importlib.import_module(module).torch = proxy
        real_type = torch.Tensor.type
        torch.Tensor.type = lambda self, *a, **k: (real_type(self, *a, **k) if a or k else
                                                   real_type(self).replace("torch.", "torch.cuda.", 1))
        torch.Tensor.cuda = lambda self, *a, **k: self
        return hold

    # initialize_parallel takes the function from the compat package at each call, so it finds this one.
    megatron_cpu.enter_cpu_adaptations = enter_with_distributed_optimizer
    check = api._check_before_work

    def check_without_the_cpu_refusal(cfg, **kwargs):
        cfg.hyperparameters.use_distributed_optimizer = False
        try:
            check(cfg, **kwargs)
        finally:
            cfg.hyperparameters.use_distributed_optimizer = True

    api._check_before_work = check_without_the_cpu_refusal
    settings = _settings(root, name, "all_weights", tp)
    settings["hyperparameters"]["use_distributed_optimizer"] = True
    _train(rank, root, name, "all_weights", tp, kill_at_save, settings=settings)


def _distributed_optimizer_reference(root: Path) -> dict:
    """Per-step losses of the uninterrupted DP=2 distributed-optimizer job (run once per module)."""
    if not (root / "distopt-ref" / "result.json").exists():
        run_world(_distributed_optimizer_job, 2, str(root), "distopt-ref", 0)
    return _train_losses(root / "distopt-ref")


def test_distributed_optimizer_job_resumes_to_the_same_losses(root):
    """Saved at DP=2 with the distributed optimizer, killed mid-save, resumed at DP=2: the same per-step losses
    as an uninterrupted run (mcore 0.16.1 with torch's Adam needs ``checkpointing._allocate_adam_state`` and
    ``_restore_adam_steps`` for this; without them the resume fails or Adam's step count restarts)."""
    reference = _distributed_optimizer_reference(root)
    with pytest.raises(Exception):
        run_world(_distributed_optimizer_job, 2, str(root), "distopt-killed", KILL_AT_SAVE)
    run_world(_distributed_optimizer_job, 2, str(root), "distopt-killed", 0)
    resumed = _train_losses(root / "distopt-killed")
    assert sorted(resumed) == list(range(1, STEPS + 1))
    for step, loss in reference.items():
        assert resumed[step] == pytest.approx(loss, rel=1e-6, abs=1e-7), step


def test_distributed_optimizer_checkpoint_resumes_at_another_dp_size_but_not_another_tp(root):
    reference = _distributed_optimizer_reference(root)
    with pytest.raises(Exception):
        run_world(_distributed_optimizer_job, 2, str(root), "distopt-dp", KILL_AT_SAVE)
    with pytest.raises(Exception, match="saved with the distributed optimizer at model.tensor_parallel_size=1, "
                                        "model.pipeline_parallel_size=1"):
        run_world(_distributed_optimizer_job, 2, str(root), "distopt-dp", 0, 2)
    run_world(_distributed_optimizer_job, 1, str(root), "distopt-dp", 0)  # DP=2 -> DP=1
    resumed = _train_losses(root / "distopt-dp")
    assert sorted(resumed) == list(range(1, STEPS + 1))
    for step, loss in reference.items():
        assert resumed[step] == pytest.approx(loss, rel=1e-4), step
