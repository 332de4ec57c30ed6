"""all_weights and lora_merged: TP/DP parity, and exported HF checkpoints that transformers loads and scores equally."""

import json
from pathlib import Path

import pytest
import torch

from _multiproc import run_world
from _tiny import write_classification_data, write_tiny_model_dir

STEPS = 3


def _train(rank: int, root: str, name: str, finetuning: str, tp: int, sp: bool = False) -> None:
    from nemo_customizer.api import customize

    customize(
        "tiny-llama-test", dataset=f"{root}/data", output_dir=f"{root}/{name}", progress_bar=False,
        hyperparameters={"finetuning_type": finetuning, "epochs": 1, "batch_size": 8, "micro_batch_size": 2,
                         "learning_rate": 2e-3, "max_steps": STEPS, "lora": {"adapter_dropout": 0.0}},
        model={"checkpoint": f"{root}/model", "random_weights": False, "tensor_parallel_size": tp,
               "use_sequence_parallel": sp},
    )


def _metrics(job: Path):
    rows = [json.loads(line) for line in (job / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if r["event"] == "train"], [r["val_loss"] for r in rows if r["event"] == "validation"]


def _hf_validation_loss(model_dir: Path, data_dir: Path) -> float:
    """Token-mean loss of the completion tokens of validation.jsonl, computed by transformers."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    from nemo_customizer.data import load_dataset, tokenize_examples

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = LlamaForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    examples, _ = tokenize_examples(load_dataset(data_dir).val, tokenizer, 128)
    total, count = 0.0, 0
    with torch.no_grad():
        for example in examples:
            ids = torch.tensor([example.input_ids])
            logits = model(ids).logits[0, :-1]
            mask = torch.tensor(example.loss_mask[1:], dtype=torch.bool)
            losses = torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="none")
            total += losses[mask].sum().item()
            count += int(mask.sum())
    return total / count


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("full")
    write_tiny_model_dir(root / "model")
    write_classification_data(root / "data", n_train=32, n_val=8)
    return root


LAYOUTS = {"tp2": (2, 2, False), "tp2sp": (2, 2, True), "dp2": (2, 1, False)}  # name: (processes, tp, sp)


@pytest.mark.parametrize("finetuning,layout", [("all_weights", "tp2"), ("lora_merged", "tp2"),
                                               ("all_weights", "tp2sp"), ("all_weights", "dp2")])
def test_parallel_matches_single_and_export_loads_in_transformers(root, finetuning, layout):
    if not (root / f"{finetuning}-single" / "result.json").exists():
        run_world(_train, 1, str(root), f"{finetuning}-single", finetuning, 1)
    processes, tp, sp = LAYOUTS[layout]
    run_world(_train, processes, str(root), f"{finetuning}-{layout}", finetuning, tp, sp)
    single_train, single_val = _metrics(root / f"{finetuning}-single")
    par_train, par_val = _metrics(root / f"{finetuning}-{layout}")
    assert len(single_train) == STEPS
    assert par_train == pytest.approx(single_train, abs=1e-4)
    assert par_val == pytest.approx(single_val, abs=1e-4)
    assert single_train[-1] < single_train[0]

    result = json.loads((root / f"{finetuning}-{layout}" / "result.json").read_text())
    exported = Path(result["model_path"])
    assert (exported / "config.json").exists() and (exported / "tokenizer_config.json").exists()
    # The exported weights are the trained ones: transformers scores the validation set as training did.
    assert _hf_validation_loss(exported, root / "data") == pytest.approx(result["best_val_loss"], abs=1e-4)
    if finetuning == "lora_merged":
        assert (Path(result["adapter_path"]) / "adapter_model.safetensors").exists()
    else:
        assert result["adapter_path"] == ""
