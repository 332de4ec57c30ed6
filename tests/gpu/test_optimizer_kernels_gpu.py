"""The Triton AdamW updates of ``training.bf16_adamw`` against fp32 AdamW arithmetic (``Bf16AdamW``, bf16 weights
updated in place) and against torch's fused AdamW (``MasterAdamW``, fp32 master weights)."""

from __future__ import annotations

import pytest
import torch

from _relative_error import worst_rel

pytestmark = pytest.mark.gpu

N = 3_000_001  # not a multiple of the kernels' block


def test_bf16_adamw_matches_fp32_adamw_with_unbiased_rounding(generator):
    """Moments equal to bf16 rounding; every weight one of the two bf16 neighbours of the fp32 result and unbiased on
    average; a step with ``found_inf`` set changes nothing."""
    from nemo_customizer.training.bf16_adamw import Bf16AdamW

    weight = (torch.randn(N, generator=generator) * 0.02).cuda().to(torch.bfloat16)
    grad = torch.randn(N, generator=generator).cuda().to(torch.bfloat16)
    exp_avg = (torch.randn(N, generator=generator) * 0.1).cuda().to(torch.bfloat16)
    exp_avg_sq = (torch.rand(N, generator=generator) * 0.01).cuda().to(torch.bfloat16)
    param = torch.nn.Parameter(weight.clone())
    optimizer = Bf16AdamW([param], lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    optimizer.state[param].update(step=torch.tensor(4.0, device="cuda"), exp_avg=exp_avg.clone(),
                                  exp_avg_sq=exp_avg_sq.clone())
    param.grad = grad
    optimizer.grad_scale = torch.tensor(2.0, device="cuda")
    optimizer.found_inf = torch.tensor(1.0, device="cuda")
    optimizer.step()
    state = optimizer.state[param]
    assert torch.equal(param.detach(), weight), "a step with found_inf changed the weights"
    assert float(state["step"]) == 4.0 and torch.equal(state["exp_avg"], exp_avg), "... or the state"

    optimizer.found_inf = torch.tensor(0.0, device="cuda")
    optimizer.step()
    g = grad.float() / 2.0
    m = exp_avg.float() * 0.9 + g * 0.1
    v = exp_avg_sq.float() * 0.95 + g * g * 0.05
    expected = weight.float() * (1 - 1e-3 * 0.1) - (1e-3 / (1 - 0.9 ** 5)) * m / (v.sqrt() / (1 - 0.95 ** 5) ** 0.5 + 1e-8)
    assert float(state["step"]) == 5.0
    assert worst_rel([(state["exp_avg"].float(), m), (state["exp_avg_sq"].float(), v)]) <= 1e-2
    # A bf16 step is at most 2^-7 of the value (8 significant bits). Near 0 the fp32 result itself carries the
    # cancellation error of weight - update, so the bound there is that of 1e-4.
    ulp = expected.abs().clamp(min=1e-4) * 2.0 ** -7
    off = (param.detach().float() - expected) * expected.sign() / ulp  # > 0: rounded away from zero
    assert bool((off.abs() <= 1.05).all()), "a weight is not within one bf16 step of the fp32 result"
    bias = off.mean().abs().item()  # rounding toward zero (truncation) would give about -0.25
    assert bias < 0.01, f"mean rounding offset {bias:.1e} bf16 steps"


def test_master_adamw_matches_torch_fused_adamw(generator):
    """Three steps over the same fp32 masters: masters and moments close, the bf16 model copy equal to the masters
    rounded to nearest; a step with ``found_inf`` set changes nothing."""
    from nemo_customizer.training.bf16_adamw import MasterAdamW

    start = (torch.randn(N, generator=generator) * 0.02).cuda()
    grads = [torch.randn(N, generator=generator).cuda() for _ in range(3)]
    reference = torch.nn.Parameter(start.clone())
    torch_adamw = torch.optim.AdamW([reference], lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, fused=True)
    master = torch.nn.Parameter(start.clone())
    model = start.to(torch.bfloat16)
    ours = MasterAdamW([master], {id(master): model}, lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    for grad in grads:
        reference.grad, master.grad = grad.clone(), grad.clone()
        torch_adamw.step()
        ours.step()
    before = master.detach().clone(), model.clone()
    ours.found_inf = torch.tensor(1.0, device="cuda")
    ours.step()
    assert torch.equal(master.detach(), before[0]) and torch.equal(model, before[1]), "found_inf changed a weight"
    state, ref_state = ours.state[master], torch_adamw.state[reference]
    assert float(state["step"]) == 3.0
    assert worst_rel([(master.detach() - start, reference.detach() - start),
                      (state["exp_avg"], ref_state["exp_avg"]), (state["exp_avg_sq"], ref_state["exp_avg_sq"])]) <= 1e-4
    assert torch.equal(model, master.detach().to(torch.bfloat16)), "the bf16 copy is not the masters rounded to nearest"
