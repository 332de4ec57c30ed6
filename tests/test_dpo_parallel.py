"""DPO jobs at TP=2 with sequence parallelism (all_weights), PP=2 (packed pairs) and DP=2 on CPU over gloo give the
same per-step losses, rewards, gradient norms, validation and exports as one process. Every layout's jobs run in one
process group (two spawns in all: one process, then two)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from _multiproc import run_world
from _pairs import write_preference_data
from _tiny import write_tiny_model_dir

STEPS = 3

# name -> (finetuning_type, sequence packing, {parallel sizes at two processes})
CASES = {  # all_weights at TP=2: the output weight trains, each vocabulary shard's gradient recomputed per position
    "tp2sp-all_weights": ("all_weights", False, {"tensor_parallel_size": 2, "use_sequence_parallel": True}),
    "pp2-packed": ("lora", True, {"pipeline_parallel_size": 2}),
    "dp2": ("lora", False, {}),
}


def _run_jobs(rank: int, root: str, world: int) -> None:
    import torch.distributed as dist

    from nemo_customizer.api import customize

    dist.init_process_group("gloo")  # the jobs use it and leave it up (they did not start it)
    try:
        for name, (finetuning, packed, layout) in CASES.items():
            customize(
                "tiny-llama-test", dataset=f"{root}/data", output_dir=f"{root}/world{world}/{name}", device="cpu",
                progress_bar=False,
                hyperparameters={"training_type": "dpo", "finetuning_type": finetuning, "epochs": 1,
                                 "batch_size": 8, "micro_batch_size": 2, "learning_rate": 2e-3, "max_steps": STEPS,
                                 "val_check_interval": 2, "sequence_packing_enabled": packed,
                                 "lora": {"adapter_dropout": 0.0, "target_modules": ["q_proj", "v_proj", "o_proj",
                                                                                     "down_proj"]},
                                 "dpo": {"ref_policy_kl_penalty": 0.5, "sft_loss_weight": 0.1}},
                model={"checkpoint": f"{root}/model", "random_weights": False, **(layout if world > 1 else {})},
            )
    finally:
        dist.destroy_process_group()


def _metrics(job: Path) -> dict:
    rows = [json.loads(line) for line in (job / "metrics.jsonl").read_text().splitlines()]
    keys = ("loss", "grad_norm", "rewards_chosen", "rewards_rejected", "reward_margin", "pairs")
    out = {key: [r[key] for r in rows if r["event"] == "train"] for key in keys}
    out.update({key: [r[key] for r in rows if r["event"] == "validation"]
                for key in ("val_loss", "val_rewards_chosen", "val_rewards_rejected", "val_reward_accuracy")})
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("dpo_parallel")
    write_tiny_model_dir(root / "model")
    write_preference_data(root / "data", n_train=32, n_val=6)  # 6 held-out pairs: the last batch is padded
    run_world(_run_jobs, 1, str(root), 1)
    run_world(_run_jobs, 2, str(root), 2)
    return root


@pytest.mark.parametrize("name", list(CASES))
def test_parallel_dpo_equals_one_process(runs, name):
    single, parallel = _metrics(runs / "world1" / name), _metrics(runs / "world2" / name)
    assert len(single["loss"]) == STEPS and len(single["val_loss"]) == 2
    assert single["pairs"] == parallel["pairs"]
    assert CASES[name][1] or single["pairs"] == [8] * STEPS  # packed: whole bins of about 8 pairs per step
    for key, expected in single.items():
        assert parallel[key] == pytest.approx(expected, abs=1e-4), key
    assert single["val_loss"][-1] < single["val_loss"][0] or single["val_reward_accuracy"][-1] > 0
    export = "adapter/adapter_model.safetensors" if CASES[name][0] == "lora" else "model/model.safetensors"
    ours, ref = load_file(str(runs / "world2" / name / export)), load_file(str(runs / "world1" / name / export))
    assert ours.keys() == ref.keys() and ref
    for key in ref:
        assert torch.allclose(ours[key], ref[key], atol=1e-4), key
