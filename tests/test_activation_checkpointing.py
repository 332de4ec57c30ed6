"""hyperparameters.activation_checkpointing: recomputing every layer in backward trains exactly as keeping its
activations does, for LoRA (frozen embedding, so no layer input needs grad by itself) and full fine-tuning."""

import json

import pytest

from _tiny import write_classification_data, write_tiny_model_dir


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("activation_checkpointing")
    write_tiny_model_dir(root / "model")
    write_classification_data(root / "data", n_train=48, n_val=8)
    return root


def _losses(root, name: str, finetuning: str, checkpointing: bool) -> list:
    from nemo_customizer.api import customize

    customize(
        "tiny-llama-test", dataset=str(root / "data"), output_dir=str(root / name), device="cpu", progress_bar=False,
        hyperparameters={"finetuning_type": finetuning, "epochs": 2, "batch_size": 16, "micro_batch_size": 2,
                         "max_steps": 4, "learning_rate": 5e-3, "sequence_packing_enabled": True,
                         "activation_checkpointing": checkpointing, "lora": {"adapter_dropout": 0.1}},
        model={"checkpoint": str(root / "model"), "random_weights": False},
    )
    rows = [json.loads(line) for line in (root / name / "metrics.jsonl").read_text().splitlines()]
    return [r.get("loss", r.get("val_loss")) for r in rows if r["event"] in ("train", "validation")]


@pytest.mark.parametrize("finetuning", ["lora", "all_weights"])
def test_recomputed_layers_train_like_stored_activations(inputs, finetuning):
    stored = _losses(inputs, f"{finetuning}-stored", finetuning, False)
    recomputed = _losses(inputs, f"{finetuning}-recomputed", finetuning, True)
    assert len(stored) >= 5 and len(set(stored)) > 1  # it trained: the losses moved
    # Dropout (LoRA) included: the recomputation replays the forward's RNG state.
    assert recomputed == pytest.approx(stored, rel=1e-6)
