"""A ``-m`` sweep on CUDA: its jobs run one after another in one process, each with its own parallel state, model,
CUDA graphs and cached allocations, so a later job must train exactly as it would alone."""

import csv
import json
import textwrap

import pytest

from _tiny import train_losses

pytestmark = pytest.mark.gpu


def test_a_two_job_sweep_on_cuda_trains_each_job_as_it_would_alone(tiny_jobs, tmp_path, capsys):
    from nemo_customizer import cli, customize

    job_file = tmp_path / "tiny_job.yaml"
    job_file.write_text(textwrap.dedent(f"""\
        defaults:
          - model: tiny-llama-test
          - _self_
        model:
          checkpoint: {tiny_jobs.root / 'model'}
          random_weights: false
        dataset:
          path: {tiny_jobs.root / 'data'}
        hyperparameters:
          epochs: 1
          batch_size: 8
          micro_batch_size: 4
          max_steps: 6
          cuda_graphs: true
          lora:
            adapter_dropout: 0.0
        output_dir: {tmp_path / 'sweep'}
        device: cuda
        precision: bf16
        progress_bar: false
        """))
    code = cli.main(["--config-path", str(tmp_path), "--config-name", "tiny_job", "-m",
                     "hyperparameters.learning_rate=1e-3,3e-3"])
    assert code == 0, capsys.readouterr()
    rows = list(csv.DictReader((tmp_path / "sweep" / "sweep.csv").open()))
    assert [r["status"] for r in rows] == ["completed", "completed"]
    jobs = [tmp_path / "sweep" / name for name in ("0_learning_rate=0.001", "1_learning_rate=0.003")]
    swept = [train_losses(job) for job in jobs]
    assert all(len(losses) == 6 for losses in swept)
    assert swept[0][0] == pytest.approx(swept[1][0], rel=1e-6)  # the same first step (same weights, same batch)
    assert swept[0][-1] != swept[1][-1]  # and then the learning rates part them

    # the second job again, alone in a fresh job directory: what it trained after the first job is unchanged
    alone = customize(config=str(job_file), output_dir=str(tmp_path / "alone"),
                      hyperparameters={"learning_rate": 3e-3})
    assert alone.steps == 6
    assert train_losses(tmp_path / "alone") == pytest.approx(swept[1], rel=2e-3)
    assert json.loads((jobs[1] / "result.json").read_text())["steps"] == 6
