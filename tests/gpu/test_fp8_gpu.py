"""``precision=fp8`` on a Hopper GPU: the Triton quantizer against the torch one, ``torch._scaled_mm`` against the
simulated arithmetic the CPU tests check, and a small Llama-shaped LoRA job against bf16 on the same random weights
(logits, one step's LoRA gradients, a 20-step loss curve). ``scripts/fp8_numerics.py`` measures the same at 8B."""

from __future__ import annotations

import json

import pytest
import torch

from _scripts import load_script

pytestmark = pytest.mark.gpu

SMALL_LLAMA = dict(hidden_size=1024, num_attention_heads=16, num_key_value_heads=4, head_dim=64,
                   intermediate_size=2816, vocab_size=32000)
"""Llama-shaped (GQA, SwiGLU), every linear a multiple of 16."""
LOGITS_MAX_REL = 5e-2
"""max|fp8 - bf16| / max|bf16| of the logits."""
GRAD_MEDIAN_REL = 0.15
"""Per LoRA group (q_proj.lora_A, ...): the median over layers of max|fp8 - bf16| / max|bf16| of one step's
gradient."""
LOSS_STEP_REL = 2e-2
"""Each of 20 training steps' loss against bf16's, relative."""


@pytest.fixture(autouse=True)
def hopper():
    from nemo_customizer.models.fp8_linear import fp8_unavailable_reason

    reason = fp8_unavailable_reason(torch.device("cuda"))
    if reason:
        pytest.skip(f"FP8 does not run here: {reason}")


def _numerics_script():
    return load_script("fp8_numerics")


@pytest.mark.parametrize("with_multiplier", [False, True])
def test_triton_quantizer_matches_the_torch_one(generator, with_multiplier):
    from nemo_customizer.models.fp8_linear import quantize_rows, quantize_rows_reference

    x = (torch.randn(301, 5000, generator=generator) * 3).to(torch.bfloat16).cuda()
    x[7] = 0  # an all-zero row quantizes to zeros with a finite scale
    multiplier = torch.rand(5000, generator=generator).cuda() * 1e-3 if with_multiplier else None
    q, scale = quantize_rows(x, multiplier)
    q_ref, scale_ref = quantize_rows_reference(x, multiplier)
    assert q.dtype == torch.float8_e4m3fn and scale.shape == (301, 1) and scale.dtype == torch.float32
    torch.testing.assert_close(scale, scale_ref, rtol=1e-6, atol=0)
    # The kernel's division may round differently in the last bit: at most one e4m3 step apart, rarely.
    differ = q.float() != q_ref.float()
    assert differ.float().mean().item() < 1e-3
    assert ((q.float() - q_ref.float()).abs() <= q_ref.float().abs() / 8 + 2 ** -9)[differ].all()
    assert not q[7].float().any()


def test_scaled_mm_equals_the_simulated_arithmetic(generator):
    """Every converted linear of a small model: forward and input gradient through ``torch._scaled_mm`` equal the
    simulated fp32 matmul of the same e4m3 values (what the CPU tests check) up to the bf16 output's rounding."""
    from nemo_customizer.models.fp8_linear import Fp8FrozenLinear
    from nemo_customizer.training.session import TrainingSession

    script = _numerics_script()
    cfg = script._config("llama-3.2-1b-instruct", "fp8", ["q_proj", "v_proj"], 256, 2, SMALL_LLAMA)
    with TrainingSession(cfg, checkpoint_dir=None) as session:
        model = session.build_model()
        layers = [m for m in model.modules() if isinstance(m, Fp8FrozenLinear)]
        assert len(layers) == 2 * 4 and not any(m.simulate for m in layers)  # qkv, proj, fc1, fc2 of 2 layers
        for layer in layers:
            x = torch.randn(200, layer.in_features, generator=generator).to(torch.bfloat16).cuda()
            grad = (torch.randn(200, layer.out_features, generator=generator) * 1e-3).to(torch.bfloat16).cuda()
            out, grad_in = layer.forward_gemm(x), layer.input_grad_gemm(grad)
            layer.simulate = True
            out_sim, grad_in_sim = layer.forward_gemm(x), layer.input_grad_gemm(grad)
            layer.simulate = False
            assert out.dtype == grad_in.dtype == torch.bfloat16
            for ours, simulated in ((out, out_sim), (grad_in, grad_in_sim)):
                rel = (ours.float() - simulated).abs().max() / simulated.abs().max()
                assert rel.item() < 1e-2, layer


def test_fp8_lora_job_stays_close_to_bf16():
    rows = {row["measure"]: row for row in _numerics_script().compare(
        "llama-3.2-1b-instruct", targets=["q_proj", "v_proj"], seq=512, steps=20, layers=4, architecture=SMALL_LLAMA)}
    print(json.dumps(rows))
    assert rows["logits"]["max_rel"] < LOGITS_MAX_REL
    for group, errors in rows["lora_grads"]["groups"].items():
        assert errors["median"] < GRAD_MEDIAN_REL, group
    assert rows["loss_curve"]["max_step_rel"] < LOSS_STEP_REL
    curve = rows["loss_curve"]["fp8"]
    assert curve[-1] < curve[0]  # it trains
