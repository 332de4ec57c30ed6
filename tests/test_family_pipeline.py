"""PP=2 training on CPU over gloo equals one process for every family beside Llama (``test_pipeline_parallel`` covers
Llama): per-step losses, gradient norms, validation losses and the exported adapter (or model) of short ``model=hf``
jobs on tiny random checkpoints. Each family's odd parts cross the stage boundary: Qwen2's q/k/v biases and tied
embedding, Qwen3's q/k norms, Phi-3's fused projections, Mistral's window (shorter than the sequences), Gemma 3's
sandwich norms, scaled embedding and interleaved windows (two layers per stage: a windowed and a full one on each) and
Gemma 2's softcapped attention scores and logits (the last stage caps the logits)."""

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from _multiproc import run_world
from _tiny import TINY_VOCAB, tiny_arch, write_classification_data, write_tiny_checkpoint, write_tiny_tokenizer

STEPS = 3
WINDOW = 8  # shorter than every training sequence (about 15 to 40 byte tokens)


def _gemma3():
    arch = tiny_arch(architecture="Gemma3ForCausalLM", layers=4, head_dim=24, vocab=TINY_VOCAB, tied=True,
                     sliding_window=WINDOW, layer_types=["sliding_attention", "full_attention"] * 2)
    return dataclasses.replace(arch, model_type="gemma3_text", rope_theta=1e6, rope_local_base_freq=100.0,
                               query_pre_attn_scalar=20, rms_norm_eps=1e-6)


def _gemma2():
    arch = tiny_arch(architecture="Gemma2ForCausalLM", layers=4, head_dim=24, vocab=TINY_VOCAB, tied=True,
                     sliding_window=WINDOW, layer_types=["sliding_attention", "full_attention"] * 2)
    return dataclasses.replace(arch, model_type="gemma2", query_pre_attn_scalar=20, rms_norm_eps=1e-6,
                               attn_logit_softcapping=5.0, final_logit_softcapping=3.0)


# family → its tiny architecture (GQA everywhere: 4 heads, 2 key/value heads)
FAMILIES = {
    "qwen2": tiny_arch(architecture="Qwen2ForCausalLM", vocab=TINY_VOCAB, tied=True),
    "qwen3": tiny_arch(architecture="Qwen3ForCausalLM", vocab=TINY_VOCAB, head_dim=24),
    "phi3": tiny_arch(architecture="Phi3ForCausalLM", vocab=TINY_VOCAB),
    "mistral": tiny_arch(architecture="MistralForCausalLM", vocab=TINY_VOCAB, sliding_window=WINDOW),
    "gemma3": _gemma3(),
    "gemma2": _gemma2(),
}

# LoRA on every linear layer, under the names PEFT uses for the family
TARGETS = {family: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"] for family in FAMILIES}
TARGETS["phi3"] = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]

# case → (family, finetuning_type)
CASES = {f"{family}-lora": (family, "lora") for family in FAMILIES}
CASES["gemma3-all_weights"] = ("gemma3", "all_weights")


def _write_checkpoint(directory: Path, arch) -> None:
    hf = write_tiny_checkpoint(directory, dataclasses.replace(arch, bos_token_id=1, eos_token_id=2))
    if arch.model_type in ("gemma2", "gemma3_text"):  # Gemma's norms scale by 1 + w: center the weights on 0, not 1
        with torch.no_grad():
            for name, param in hf.named_parameters():
                if "norm" in name:
                    param.sub_(1.0)
        hf.save_pretrained(directory)
    write_tiny_tokenizer(directory)


def _run_jobs(rank: int, root: str, pp: int) -> None:
    """Every case, one after the other, in one process group (a world per job would cost seconds each)."""
    import torch.distributed as dist

    from nemo_customizer.api import customize

    dist.init_process_group("gloo")  # the jobs use it and leave it up (they did not start it)
    try:
        for name, (family, finetuning) in CASES.items():
            customize(
                "hf", dataset=f"{root}/data", output_dir=f"{root}/pp{pp}/{name}", device="cpu", progress_bar=False,
                hyperparameters={
                    "finetuning_type": finetuning, "epochs": 1, "batch_size": 8, "micro_batch_size": 2,
                    "learning_rate": 2e-3, "max_steps": STEPS, "val_check_interval": 2,
                    "lora": {"adapter_dropout": 0.0, "target_modules": TARGETS[family]},
                },
                model={"checkpoint": f"{root}/{family}", "max_seq_length": 64, "pipeline_parallel_size": pp},
            )
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("family-pipeline")
    for family, arch in FAMILIES.items():
        _write_checkpoint(root / family, arch)
    write_classification_data(root / "data", n_train=24, n_val=4)
    run_world(_run_jobs, 1, str(root), 1)
    run_world(_run_jobs, 2, str(root), 2)
    return root


def _metrics(job: Path) -> dict:
    rows = [json.loads(line) for line in (job / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["event"] == "train"]
    return {"loss": [r["loss"] for r in train], "grad_norm": [r["grad_norm"] for r in train],
            "val_loss": [r["val_loss"] for r in rows if r["event"] == "validation"]}


def _safetensors(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path))


@pytest.mark.parametrize("name", list(CASES))
def test_pipeline_parallel_matches_single_process(runs, name):
    family, finetuning = CASES[name]
    single, pp2 = runs / "pp1" / name, runs / "pp2" / name
    expected, actual = _metrics(single), _metrics(pp2)
    assert len(expected["loss"]) == STEPS and len(expected["val_loss"]) >= 1
    for key in ("loss", "grad_norm", "val_loss"):
        assert actual[key] == pytest.approx(expected[key], abs=1e-4), key
    assert expected["loss"][-1] < expected["loss"][0]  # it trained

    result, reference = (json.loads((job / "result.json").read_text()) for job in (pp2, single))
    for key in ("steps", "trainable_parameters", "total_parameters"):  # both stages together, a tied embedding once
        assert result[key] == reference[key], key
    export = "adapter/adapter_model.safetensors" if finetuning == "lora" else "model/model.safetensors"
    ours, ref = _safetensors(pp2 / export), _safetensors(single / export)  # gathered from both stages
    assert ours.keys() == ref.keys()
    for key in ref:
        assert torch.allclose(ours[key], ref[key], atol=1e-4), (export, key)
    if finetuning == "lora":
        assert len(ref) == 2 * len(TARGETS[family]) * FAMILIES[family].num_hidden_layers  # A and B, every layer
