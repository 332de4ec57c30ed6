"""``precision=fp8`` on the CPU, where the FP8 arithmetic is simulated (real e4m3 casts, an fp32 matmul): the
rounding against a quantizer written here, gradient routing, the config errors, TP=2+SP against TP=1, and tiny LoRA
jobs end to end (checkpoint, adapter, merged export from the checkpoint; DPO with its reference on the FP8 base).
``tests/gpu/test_fp8_gpu.py`` checks that ``torch._scaled_mm`` computes what the simulation does."""

from __future__ import annotations

import json

import pytest
import torch

from _multiproc import run_world
from _tiny import train_losses, write_classification_data, write_tiny_model_dir

E4M3_GRID = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
E4M3_GRID = E4M3_GRID[E4M3_GRID.isfinite()].unique()  # every finite e4m3fn value, sorted


def _nearest_e4m3(values: torch.Tensor) -> torch.Tensor:
    """Round to the nearest e4m3fn value by search over all of them (no cast involved)."""
    index = torch.searchsorted(E4M3_GRID, values.contiguous()).clamp(1, len(E4M3_GRID) - 1)
    below, above = E4M3_GRID[index - 1], E4M3_GRID[index]
    return torch.where((values - below).abs() <= (above - values).abs(), below, above)


def _reference_quantize(x: torch.Tensor):
    scale = x.abs().amax(dim=-1, keepdim=True).clamp(min=1e-12) / 448.0
    return _nearest_e4m3((x / scale).clamp(-448, 448)), scale


def test_rows_quantize_to_the_nearest_e4m3_value_of_a_per_row_scale():
    from nemo_customizer.models.fp8_linear import quantize_rows

    generator = torch.Generator().manual_seed(0)
    x = torch.randn(64, 96, generator=generator) * torch.logspace(-3, 3, 64)[:, None]
    x[5] = 0
    q, scale = quantize_rows(x)
    expected_q, expected_scale = _reference_quantize(x)
    assert q.dtype == torch.float8_e4m3fn and scale.shape == (64, 1)
    torch.testing.assert_close(scale, expected_scale, rtol=0, atol=0)
    # ties (rare in random data) may round either way in the search; everything else is exact
    mismatch = q.float() != expected_q
    assert mismatch.float().mean() < 1e-3
    assert (q.float().abs().amax(dim=-1)[torch.arange(64) != 5] == 448).all()  # each row's maximum maps onto 448
    assert not q[5].float().any()
    # e4m3's three mantissa bits: dequantized within 2^-4 relative, or half the smallest subnormal step absolute
    error = (q.float() * scale - x).abs()
    assert (error <= x.abs() * 2 ** -4 + scale * 2 ** -10 + 1e-30).all()
    multiplier = torch.rand(96, generator=generator)
    q_scaled, scale_scaled = quantize_rows(x, multiplier)
    expected_q, expected_scale = _reference_quantize(x * multiplier)
    torch.testing.assert_close(scale_scaled, expected_scale, rtol=0, atol=0)
    assert (q_scaled.float() != expected_q).float().mean() < 1e-3


@pytest.fixture(scope="module")
def linears(cpu_parallel):
    """A megatron column- and row-parallel linear (TP=1, fp32) and a random input."""
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear

    from nemo_customizer.models.gpt import transformer_config
    from _tiny import tiny_arch

    config = transformer_config(tiny_arch(), tensor_parallel_size=1, pipeline_parallel_size=1,
                                sequence_parallel=False, params_dtype=torch.float32, device=torch.device("cpu"),
                                perform_initialization=True)
    init = torch.nn.init.normal_
    column = ColumnParallelLinear(64, 96, config=config, init_method=init, bias=False, gather_output=False)
    row = RowParallelLinear(96, 64, config=config, init_method=init, bias=False, input_is_parallel=True,
                            skip_bias_add=False)
    for linear in (column, row):
        linear.weight.requires_grad_(False)
    return column, row


@pytest.mark.parametrize("which", [0, 1])
def test_simulated_gemms_are_the_scaled_products_of_e4m3_values(linears, which):
    from nemo_customizer.models.fp8_linear import Fp8FrozenLinear

    base = linears[which]
    weight = base.weight.detach().clone()
    layer = Fp8FrozenLinear(base, simulate=True)
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(3, 5, weight.shape[1], generator=generator, requires_grad=True)
    out, bias = layer(x)
    assert bias is None and out.shape == (3, 5, weight.shape[0])
    # forward: dequantized x (per token) times dequantized W (per output row), transposed
    wq, sw = _reference_quantize(weight)
    xq, sx = _reference_quantize(x.detach().reshape(15, -1))
    torch.testing.assert_close(out.detach().reshape(15, -1), (xq * sx) @ (wq * sw).t(), rtol=1e-5, atol=1e-5)
    exact = x.detach() @ weight.t()
    assert ((out.detach() - exact).abs().max() / exact.abs().max()).item() < 0.1
    # input gradient: dy times the row scales, quantized per token, times Wq
    dy = torch.randn(out.shape, generator=generator)
    out.backward(dy)
    gq, sg = _reference_quantize(dy.reshape(15, -1) * sw.view(1, -1))
    torch.testing.assert_close(x.grad.reshape(15, -1), (gq * sg) @ wq, rtol=1e-5, atol=1e-5)
    exact_grad = dy @ weight
    assert ((x.grad - exact_grad).abs().max() / exact_grad.abs().max()).item() < 0.1
    assert not any(p.requires_grad for p in layer.parameters())


def test_bf16_cast_of_a_model_keeps_the_fp8_weight_and_fp32_scales(linears):
    from nemo_customizer.models.fp8_linear import Fp8FrozenLinear

    layer = Fp8FrozenLinear(linears[0], simulate=True).bfloat16()  # what mcore's Float16Module does
    assert layer.weight_fp8.dtype == torch.float8_e4m3fn and layer.weight_scale.dtype == torch.float32
    assert not hasattr(layer, "weight") and layer.sharded_state_dict() == {}


def _config(model_dir, *overrides):
    import dataclasses

    from nemo_customizer.checkpoints.resolve import resolve_model
    from nemo_customizer.config import compose_config

    cfg = compose_config(["model=tiny-llama-test", "model.random_weights=false", f"model.checkpoint={model_dir}",
                          "device=cpu", "hyperparameters.lora.target_modules=[q_proj,v_proj]",
                          "hyperparameters.lora.adapter_dropout=0.0", *overrides])
    return dataclasses.replace(cfg, model=resolve_model(cfg.model, cfg.cache_dir).config)


def _logits_and_grads(cfg, model_dir, tokens):
    from nemo_customizer.models.fp8_linear import Fp8FrozenLinear
    from nemo_customizer.models.gpt import forward_logits
    from nemo_customizer.peft.lora import adapter_parameters
    from nemo_customizer.training.session import TrainingSession

    with TrainingSession(cfg, checkpoint_dir=model_dir) as session:
        model = session.build_model()
        converted = [m for m in model.modules() if isinstance(m, Fp8FrozenLinear)]
        adapters = adapter_parameters(model)
        generator = torch.Generator().manual_seed(3)
        for name, p in adapters.items():  # B nonzero, so A has a gradient
            if name.endswith("lora_B"):
                p.data.copy_(torch.randn(p.shape, generator=generator) * 0.1)
        logits = forward_logits(model, tokens)
        logits.square().mean().backward()
        grads = {name: p.grad.clone() for name, p in adapters.items()}
        frozen_grads = [p.grad for p in model.parameters() if not p.requires_grad]
        return logits.detach(), grads, converted, type(model.output_layer), frozen_grads


def test_lora_job_model_holds_its_frozen_linears_in_fp8_and_trains_the_adapters(model_dir):
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear

    tokens = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    fp32 = _logits_and_grads(_config(model_dir, "precision=fp32"), model_dir, tokens)
    logits, grads, converted, head, frozen_grads = _logits_and_grads(_config(model_dir, "precision=fp8"), model_dir,
                                                                     tokens)
    assert len(converted) == 2 * 4 and all(m.simulate for m in converted)  # qkv (adapted), proj, fc1, fc2 per layer
    assert head is ColumnParallelLinear  # the LM head stays as it was
    assert all(g is None for g in frozen_grads)  # nothing frozen gets a gradient
    assert ((logits - fp32[0]).abs().max() / fp32[0].abs().max()).item() < 0.1
    for name, grad in grads.items():
        reference = fp32[1][name]
        assert grad.abs().max() > 0, name
        assert ((grad - reference).abs().max() / reference.abs().max()).item() < 0.25, name


@pytest.mark.parametrize("overrides,message", [
    (["hyperparameters.finetuning_type=all_weights"], "LoRA adapters only"),
    (["hyperparameters.finetuning_type=lora_merged"], "finetuning_type=lora_merged"),
    ([], "compute capability|CUDA GPU"),
])
def test_fp8_jobs_it_cannot_run_fail_before_reading_data(tmp_path, overrides, message):
    from nemo_customizer.api import run
    from nemo_customizer.config import ConfigError, compose_config

    cfg = compose_config(["model=tiny-llama-test", "precision=fp8", "device=cpu", f"output_dir={tmp_path / 'job'}",
                          f"dataset.path={tmp_path / 'no-such-data.jsonl'}", *overrides])
    with pytest.raises(ConfigError, match=message):
        run(cfg)


# --- whole jobs (the device check bypassed: the simulated arithmetic runs them on CPU) -----------------------------

STEPS = 4


def _train(rank: int, root: str, name: str, tp: int, sp: bool) -> None:
    import nemo_customizer.models.fp8_linear as fp8_linear
    from nemo_customizer.api import customize

    fp8_linear.fp8_unavailable_reason = lambda device: None
    customize(
        "tiny-llama-test", dataset=f"{root}/data", output_dir=f"{root}/{name}", device="cpu", progress_bar=False,
        precision="fp8",
        hyperparameters={"epochs": 1, "batch_size": 8, "micro_batch_size": 2, "learning_rate": 5e-3,
                         "max_steps": STEPS, "lora": {"adapter_dropout": 0.0,
                                                      "target_modules": ["q_proj", "v_proj", "o_proj", "down_proj"]}},
        model={"checkpoint": f"{root}/model", "random_weights": False, "tensor_parallel_size": tp,
               "use_sequence_parallel": sp},
    )


@pytest.fixture(scope="module")
def fp8_job(tmp_path_factory):
    root = tmp_path_factory.mktemp("fp8")
    write_tiny_model_dir(root / "model")
    write_classification_data(root / "data", n_train=48, n_val=8)
    run_world(_train, 1, str(root), "single", 1, False)
    return root


def test_fp8_lora_job_trains_saves_and_exports_a_merged_model_from_its_checkpoint(fp8_job):
    from safetensors.torch import load_file

    from nemo_customizer.export import export_checkpoint

    losses = train_losses(fp8_job / "single")
    assert len(losses) == STEPS and losses[-1] < losses[0]
    adapter = load_file(str(fp8_job / "single" / "adapter" / "adapter_model.safetensors"))
    assert adapter and all(t.dtype != torch.float8_e4m3fn for t in adapter.values())
    # The checkpoint holds the adapters only; the merged export re-reads the base unrounded from the HF checkpoint.
    out = export_checkpoint(str(fp8_job / "single"), str(fp8_job / "merged"),
                            overrides=["hyperparameters.finetuning_type=lora_merged"])
    merged = load_file(str(next((out / "model").glob("*.safetensors"))))
    base = load_file(str(next((fp8_job / "model").glob("*.safetensors"))))
    unadapted = "model.layers.0.mlp.up_proj.weight"  # no adapter: the merge leaves it exactly as the base had it
    assert torch.equal(merged[unadapted].float(), base[unadapted].float())
    key = "model.layers.0.self_attn.q_proj.weight"
    a = adapter[f"base_model.model.{key.removesuffix('.weight')}.lora_A.weight"].float()
    b = adapter[f"base_model.model.{key.removesuffix('.weight')}.lora_B.weight"].float()
    scaling = 16 / 8  # lora alpha / adapter_dim, the defaults
    torch.testing.assert_close(merged[key].float(), base[key].float() + scaling * b @ a, rtol=1e-4, atol=1e-5)


def test_fp8_tensor_parallel_job_tracks_one_process(fp8_job):
    """TP=2 with sequence parallelism: the same communication as megatron's linears. Row-parallel weights are scaled
    per rank's input columns, so the losses agree to FP8's rounding, not exactly."""
    run_world(_train, 2, str(fp8_job), "tp2sp", 2, True)
    assert train_losses(fp8_job / "tp2sp") == pytest.approx(train_losses(fp8_job / "single"), rel=2e-2)


def _train_dpo(rank: int, root: str) -> None:
    import nemo_customizer.models.fp8_linear as fp8_linear
    from nemo_customizer.api import customize

    fp8_linear.fp8_unavailable_reason = lambda device: None
    customize("tiny-llama-test", dataset=f"{root}/pairs", output_dir=f"{root}/dpo", device="cpu", progress_bar=False,
              precision="fp8",
              hyperparameters={"training_type": "dpo", "epochs": 1, "batch_size": 8, "micro_batch_size": 2,
                               "learning_rate": 5e-3, "lora": {"adapter_dropout": 0.0},
                               "dpo": {"ref_policy_kl_penalty": 0.5}},
              model={"checkpoint": f"{root}/model", "random_weights": False})


def test_fp8_lora_dpo_job_takes_its_reference_from_the_same_fp8_base(fp8_job):
    """The reference is the FP8 base with the adapters switched off, the policy the same base with them: at the first
    step (B = 0) the two agree to rounding, so the loss is log 2 and the rewards 0; then the policy learns."""
    from _pairs import write_preference_data

    write_preference_data(fp8_job / "pairs", n_train=32, n_val=8)
    run_world(_train_dpo, 1, str(fp8_job))
    rows = [json.loads(line) for line in (fp8_job / "dpo" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["event"] == "train"]
    assert len(train) == 4
    assert train[0]["loss"] == pytest.approx(0.6931, abs=1e-3)  # -log sigmoid(0)
    assert train[0]["rewards_chosen"] == pytest.approx(0.0, abs=1e-4)
    assert train[-1]["loss"] < train[0]["loss"]
