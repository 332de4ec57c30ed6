"""hyperparameters.activation_checkpointing (whole layers) and recompute_modules (parts of each layer): recomputing
in backward trains exactly as keeping the activations does, for LoRA (frozen embedding, so no layer input needs grad
by itself) and full fine-tuning."""

import json

import pytest

from _tiny import write_classification_data, write_tiny_model_dir


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("activation_checkpointing")
    write_tiny_model_dir(root / "model")
    write_classification_data(root / "data", n_train=48, n_val=8)
    return root


def _losses(root, name: str, finetuning: str, checkpointing: bool, recompute_modules=()) -> list:
    from nemo_customizer.api import customize

    customize(
        "tiny-llama-test", dataset=str(root / "data"), output_dir=str(root / name), device="cpu", progress_bar=False,
        hyperparameters={"finetuning_type": finetuning, "epochs": 2, "batch_size": 16, "micro_batch_size": 2,
                         "max_steps": 4, "learning_rate": 5e-3, "sequence_packing_enabled": True,
                         "activation_checkpointing": checkpointing, "recompute_modules": list(recompute_modules),
                         "lora": {"adapter_dropout": 0.1, "target_modules": ["linear_qkv", "linear_proj",
                                                                              "linear_fc1", "linear_fc2"]}},
        model={"checkpoint": str(root / "model"), "random_weights": False},
    )
    rows = [json.loads(line) for line in (root / name / "metrics.jsonl").read_text().splitlines()]
    return [r.get("loss", r.get("val_loss")) for r in rows if r["event"] in ("train", "validation")]


@pytest.fixture(scope="module")
def stored(inputs):
    """Losses with every activation kept, by finetuning type."""
    return {kind: _losses(inputs, f"{kind}-stored", kind, False) for kind in ("lora", "all_weights")}


@pytest.mark.parametrize("finetuning", ["lora", "all_weights"])
def test_recomputed_layers_train_like_stored_activations(inputs, stored, finetuning):
    recomputed = _losses(inputs, f"{finetuning}-recomputed", finetuning, True)
    assert len(stored[finetuning]) >= 5 and len(set(stored[finetuning])) > 1  # it trained: the losses moved
    # Dropout (LoRA on every linear layer) included: the recomputation replays the forward's RNG state.
    assert recomputed == pytest.approx(stored[finetuning], rel=1e-6)


@pytest.mark.parametrize("finetuning, modules", [("lora", ("mlp", "core_attn")), ("all_weights", ("mlp",))])
def test_selectively_recomputed_parts_train_like_stored_activations(inputs, stored, finetuning, modules):
    recomputed = _losses(inputs, f"{finetuning}-selective", finetuning, False, modules)
    assert recomputed == pytest.approx(stored[finetuning], rel=1e-6)


def test_selective_recomputation_is_what_mcore_runs(cpu_parallel):
    """The setting reaches mcore's layers: each recomputes its MLP and its core attention (else the test above
    compares a run with itself)."""
    from nemo_customizer.config import compose_config
    from nemo_customizer.training.session import TrainingSession

    cfg = compose_config(["model=tiny-llama-test", "model.random_weights=true", "device=cpu",
                          "hyperparameters.recompute_modules=[mlp,core_attn]"])
    with TrainingSession(cfg, checkpoint_dir=None, layout=cpu_parallel) as session:
        layers = list(session.build_model().decoder.layers)
        assert session.transformer_config.recompute_granularity == "selective" and layers
        assert all(layer.recompute_mlp and layer.self_attention.checkpoint_core_attention for layer in layers)
