"""PP=2 training on CPU over gloo gives the same losses, gradient norms and exports as one process.

Every job runs once in one process and once as two pipeline stages (one layer each), for LoRA and all_weights, with
untied and tied (Llama-3.2 / SmolLM2 style) embeddings, padded and packed micro batches. Micro batches of a step have
different lengths here, so the pipeline's uniform padding (``training.step.uniform_length``) is exercised.
"""

import json
from pathlib import Path

import pytest
import torch

from _multiproc import run_world
from _tiny import write_classification_data, write_tiny_model_dir

STEPS = 3

# name -> (finetuning_type, tied embeddings, sequence packing, early stopping)
CASES = {
    "lora": ("lora", False, False, False),
    "lora-packed": ("lora", False, True, False),
    "lora_merged-tied": ("lora_merged", True, False, False),
    "all_weights": ("all_weights", False, False, False),
    "all_weights-tied": ("all_weights", True, False, False),
    "all_weights-early-stop": ("all_weights", False, False, True),
}


def _run_jobs(rank: int, root: str, pp: int) -> None:
    """Every case, one after the other, in one process group (spawning a world per job would cost seconds each)."""
    import torch.distributed as dist

    from nemo_customizer.api import customize

    dist.init_process_group("gloo")  # the jobs use it and leave it up (they did not start it)
    try:
        for name, (finetuning, tied, packed, early_stop) in CASES.items():
            customize(
                "tiny-llama-test", dataset=f"{root}/data", output_dir=f"{root}/pp{pp}/{name}", device="cpu",
                progress_bar=False,
                hyperparameters={
                    "finetuning_type": finetuning, "epochs": 1, "batch_size": 8, "micro_batch_size": 2,
                    "learning_rate": 2e-3, "max_steps": STEPS, "val_check_interval": 1 if early_stop else 2,
                    "sequence_packing_enabled": packed, "lora": {"adapter_dropout": 0.0},
                    # min_delta no step can beat: the second validation stops the job, on every rank at once
                    "early_stopping": {"patience": 1, "min_delta": 100.0} if early_stop else {},
                },
                model={"checkpoint": f"{root}/{'model-tied' if tied else 'model'}", "random_weights": False,
                       "pipeline_parallel_size": pp, "architecture": {"tie_word_embeddings": tied}},
            )
    finally:
        dist.destroy_process_group()


def _metrics(job: Path) -> dict:
    rows = [json.loads(line) for line in (job / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["event"] == "train"]
    return {"loss": [r["loss"] for r in train], "grad_norm": [r["grad_norm"] for r in train],
            "val_loss": [r["val_loss"] for r in rows if r["event"] == "validation"]}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    import dataclasses

    from _tiny import TINY_VOCAB, tiny_arch

    root = tmp_path_factory.mktemp("pipeline")
    write_tiny_model_dir(root / "model")
    tied = dataclasses.replace(tiny_arch(vocab=TINY_VOCAB, tied=True), max_position_embeddings=2048, head_dim=16,
                               bos_token_id=1, eos_token_id=2)
    write_tiny_model_dir(root / "model-tied", tied)
    write_classification_data(root / "data", n_train=32, n_val=8)
    run_world(_run_jobs, 1, str(root), 1)
    run_world(_run_jobs, 2, str(root), 2)
    return root


def _safetensors(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path))


@pytest.mark.parametrize("name", list(CASES))
def test_pipeline_parallel_matches_single_process(runs, name):
    finetuning, tied, _, early_stop = CASES[name]
    single, pp2 = runs / "pp1" / name, runs / "pp2" / name
    expected, actual = _metrics(single), _metrics(pp2)
    steps = 2 if early_stop else STEPS
    assert len(expected["loss"]) == steps and len(expected["val_loss"]) == 2
    for key in ("loss", "grad_norm", "val_loss"):
        assert actual[key] == pytest.approx(expected[key], abs=1e-4), key
    assert expected["loss"][-1] < expected["loss"][0]  # it trained

    result, reference = (json.loads((job / "result.json").read_text()) for job in (pp2, single))
    assert (result["steps"], result["stopped_early"]) == (reference["steps"], reference["stopped_early"])
    for key in ("trainable_parameters", "total_parameters"):  # both stages together, a tied embedding once
        assert result[key] == reference[key], key
    assert result["stopped_early"] == early_stop
    exports = []
    if finetuning != "all_weights":
        exports.append("adapter/adapter_model.safetensors")
    if finetuning != "lora":
        exports.append("model/model.safetensors")
    for export in exports:  # the whole model or adapter, gathered from both stages
        ours, ref = _safetensors(pp2 / export), _safetensors(single / export)
        assert ours.keys() == ref.keys()
        for key in ref:
            assert torch.allclose(ours[key], ref[key], atol=1e-4), (export, key)
    if finetuning != "lora":
        exported = _safetensors(pp2 / "model/model.safetensors")
        assert ("lm_head.weight" in exported) == (not tied)  # tied: HF re-ties lm_head to embed_tokens


def test_uniform_length_pads_with_masked_positions():
    from nemo_customizer.data import collate, collate_packed
    from nemo_customizer.data.examples import TokenizedExample
    from nemo_customizer.training.step import uniform_length

    def example(n):
        return TokenizedExample(input_ids=list(range(3, 3 + n)), loss_mask=[0] + [1] * (n - 1))

    short, long = collate([example(3), example(4)], pad_id=0), collate([example(7)], pad_id=0)
    padded = uniform_length([short, long])
    assert [b["tokens"].shape for b in padded] == [(2, 6), (1, 6)]
    assert padded[1] is long
    assert torch.equal(padded[0]["tokens"][:, :3], short["tokens"]) and padded[0]["loss_mask"][:, 3:].sum() == 0
    assert torch.equal(padded[0]["position_ids"], torch.arange(6).expand(2, 6))
    assert padded[0]["num_real_tokens"] == short["num_real_tokens"]

    bins = collate_packed([[example(3), example(4)]], pad_id=0), collate_packed([[example(10)]], pad_id=0)
    padded = uniform_length(list(bins))
    assert padded[0]["tokens"].shape == (1, 9)
    assert padded[0]["cu_seqlens"].tolist() == [0, 2, 5, 9]  # the padding is a segment of its own
    assert padded[0]["position_ids"].tolist() == [[0, 1, 0, 1, 2, 0, 1, 2, 3]]
    assert int(padded[0]["max_seqlen"]) == 4 and padded[0]["loss_mask"][0, 5:].sum() == 0
