"""DPO jobs of the tiny random Llama on CUDA (bf16) against the same jobs on the CPU (fp32): per-step losses and
rewards, LoRA (reference = adapters off) and all_weights (the loss head's per-position gradients recomputed on the
device's fused cross-entropy)."""

from __future__ import annotations

import json

import pytest

from _relative_error import worst_step_rel

pytestmark = pytest.mark.gpu

BF16_RTOL = 3e-2


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    from _pairs import write_preference_data
    from _tiny import write_tiny_model_dir

    root = tmp_path_factory.mktemp("dpo_gpu")
    write_tiny_model_dir(root / "model")
    write_preference_data(root / "pairs", n_train=48, n_val=8)
    return root


def _dpo_job(root, name: str, device: str, precision: str, finetuning: str) -> list[dict]:
    from nemo_customizer.api import customize

    customize("tiny-llama-test", dataset=str(root / "pairs"), output_dir=str(root / name), device=device,
              precision=precision, progress_bar=False,
              hyperparameters={"training_type": "dpo", "finetuning_type": finetuning, "epochs": 1, "batch_size": 8,
                               "micro_batch_size": 4, "learning_rate": 2e-3, "max_steps": 6,
                               "lora": {"adapter_dropout": 0.0}, "dpo": {"ref_policy_kl_penalty": 0.5,
                                                                         "sft_loss_weight": 0.1}},
              model={"checkpoint": str(root / "model"), "random_weights": False})
    rows = [json.loads(line) for line in (root / name / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["event"] == "train"]


@pytest.mark.parametrize("finetuning", ["lora", "all_weights"])
def test_cuda_bf16_dpo_matches_cpu_fp32(root, finetuning):
    gpu = _dpo_job(root, f"{finetuning}-cuda", "cuda", "bf16", finetuning)
    cpu = _dpo_job(root, f"{finetuning}-cpu", "cpu", "fp32", finetuning)
    assert len(gpu) == len(cpu) == 6
    losses = [r["loss"] for r in cpu], [r["loss"] for r in gpu]
    assert worst_step_rel(*losses) <= BF16_RTOL, losses
    margins = [r["reward_margin"] for r in cpu], [r["reward_margin"] for r in gpu]
    assert all(abs(a - b) <= 0.05 + 0.1 * abs(a) for a, b in zip(*margins)), margins
    assert cpu[-1]["reward_margin"] > cpu[0]["reward_margin"]  # the job learns the preference
