"""hyperparameters.fp32_master_weights=false: bf16 weights updated in place by Bf16AdamW (stochastic rounding)."""

import pytest
import torch

from nemo_customizer.config import ConfigError, compose_config, validate_config
from nemo_customizer.training.bf16_adamw import Bf16AdamW, stochastic_round_to_bf16


def test_stochastic_rounding_is_unbiased_between_the_two_neighbours():
    gen = torch.Generator().manual_seed(0)
    low = torch.tensor([1.0, -3.5, 0.0234375, 1e-20]).to(torch.bfloat16)
    high = (low.view(torch.int16) + 1).view(torch.bfloat16)  # the next bf16 value away from zero
    assert torch.all(high.float().abs() > low.float().abs())
    fraction = torch.tensor([0.25, 0.7, 0.5, 0.1])
    value = low.float() + (high.float() - low.float()) * fraction  # fp32 values strictly between the neighbours
    samples = value.expand(20000, -1).contiguous()
    noise = torch.randint(0, 65536, samples.shape, generator=gen, dtype=torch.int32)
    rounded = stochastic_round_to_bf16(samples, noise)
    assert torch.all((rounded == low) | (rounded == high))
    assert torch.all((rounded.float().mean(0) - value).abs() < 0.02 * (high.float() - low.float()).abs())
    exact = low.float().expand(100, -1).contiguous()  # representable values never move
    assert torch.equal(stochastic_round_to_bf16(exact, noise[:100]), low.expand(100, -1))


def _run(optimizer_cls, dtype, lr, steps, grads, weight_decay=0.0):
    torch.manual_seed(1)
    param = torch.nn.Parameter(torch.full((grads.shape[1],), 0.02).to(dtype))
    optimizer = optimizer_cls([param], lr=lr, betas=(0.9, 0.98), eps=1e-8, weight_decay=weight_decay)
    for step in range(steps):
        param.grad = grads[step].to(dtype)
        optimizer.step()
    return param.detach().float(), optimizer


def test_small_updates_survive_on_average_where_round_to_nearest_loses_them():
    """lr 1e-5 on weights of 0.02 (bf16 step there: 1.2e-4): torch's AdamW on bf16 weights rounds every update away,
    Bf16AdamW keeps the fp32 reference's mean displacement."""
    grads = torch.randn(20, 50000, generator=torch.Generator().manual_seed(2)).abs() + 0.5  # one sign: drift down
    reference, _ = _run(torch.optim.AdamW, torch.float32, 1e-5, 20, grads)
    nearest, _ = _run(torch.optim.AdamW, torch.bfloat16, 1e-5, 20, grads)
    ours, _ = _run(Bf16AdamW, torch.bfloat16, 1e-5, 20, grads)
    start = torch.tensor(0.02).to(torch.bfloat16).float()
    expected = (reference - 0.02).mean()
    assert expected < -1.5e-4  # ~20 updates of ~lr each
    assert (nearest - start).abs().max() == 0  # the control: every update lost
    assert (ours - start).mean() == pytest.approx(expected.item(), rel=0.05)


def test_large_updates_follow_fp32_adamw_within_bf16_rounding():
    grads = torch.randn(5, 4096, generator=torch.Generator().manual_seed(3))
    reference, ref_opt = _run(torch.optim.AdamW, torch.float32, 1e-2, 5, grads, weight_decay=0.1)
    ours, opt = _run(Bf16AdamW, torch.bfloat16, 1e-2, 5, grads, weight_decay=0.1)
    # the moments see bf16-rounded gradients and are stored in bf16: a few bf16 steps of the weight at most
    assert (ours - reference).abs().max() <= 4 * 2.0 ** -8 * reference.abs().max()
    state = next(iter(opt.state.values()))
    assert float(state["step"]) == 5 and state["exp_avg"].dtype == torch.bfloat16


def test_found_inf_skips_everything_and_grad_scale_divides():
    param = torch.nn.Parameter(torch.linspace(-1, 1, 64).to(torch.bfloat16))
    optimizer = Bf16AdamW([param], lr=1e-2)
    param.grad = torch.ones_like(param)
    optimizer.step()
    before = param.detach().clone(), {k: v.clone() for k, v in optimizer.state[param].items()}
    optimizer.found_inf, optimizer.grad_scale = torch.ones(()), torch.ones(())
    param.grad = torch.full_like(param, float("nan"))
    optimizer.step()
    assert torch.equal(param.detach(), before[0])
    assert all(torch.equal(optimizer.state[param][k], v) for k, v in before[1].items())
    # grad_scale 4 on gradients of 4: Adam sees gradients of 1 (first moment 0.1 after the first step, then 0.19)
    optimizer.found_inf, optimizer.grad_scale = torch.zeros(()), torch.full((), 4.0)
    param.grad = torch.full_like(param, 4.0)
    optimizer.step()
    assert float(optimizer.state[param]["step"]) == 2
    assert optimizer.state[param]["exp_avg"].float().mean() == pytest.approx(0.1 * 0.9 + 0.1, rel=1e-2)


def test_config_errors_before_any_work(tmp_path):
    with pytest.raises(ConfigError, match="fp32_master_weights=false keeps no fp32 state"):
        validate_config(compose_config(["model=tiny-llama-test", "dataset.path=/data",
                                        "hyperparameters.fp32_master_weights=false",
                                        "hyperparameters.use_distributed_optimizer=true"]))
    from nemo_customizer.api import customize

    with pytest.raises(ConfigError, match="fp32_master_weights=false updates bf16 weights in place"):
        customize("tiny-llama-test", dataset=str(tmp_path / "missing"), output_dir=str(tmp_path / "job"),
                  device="cpu", hyperparameters={"fp32_master_weights": False})  # CPU default precision: fp32
    assert not (tmp_path / "job").exists()
