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


def test_master_adamw_steps_like_torch_adamw_and_writes_the_model_copy():
    """MasterAdamW (fp32 masters, mixed precision): torch AdamW's arithmetic, plus the bf16 model copy of each
    updated master written in the same update; found_inf leaves masters, moments, step and copy unchanged."""
    from nemo_customizer.training.bf16_adamw import MasterAdamW

    gen = torch.Generator().manual_seed(4)
    start = torch.randn(3, 40, generator=gen) * 0.02
    grads = torch.randn(4, 3, 40, generator=gen)
    reference = torch.nn.Parameter(start.clone())
    torch_adamw = torch.optim.AdamW([reference], lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    master = torch.nn.Parameter(start.clone())
    model = start.to(torch.bfloat16)
    ours = MasterAdamW([master], {id(master): model}, lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    for grad in grads[:3]:
        reference.grad, master.grad = grad.clone(), grad.clone()
        torch_adamw.step()
        ours.step()
        torch.testing.assert_close(master.detach(), reference.detach(), rtol=1e-6, atol=1e-8)
        assert torch.equal(model, master.detach().to(torch.bfloat16))
    before = master.detach().clone(), model.clone(), {k: v.clone() for k, v in ours.state[master].items()}
    ours.found_inf, ours.grad_scale = torch.ones(()), torch.ones(())
    master.grad = grads[3]
    ours.step()
    assert torch.equal(master.detach(), before[0]) and torch.equal(model, before[1])
    assert all(torch.equal(ours.state[master][k], v) for k, v in before[2].items())


def test_use_master_adamw_replaces_mcore_s_copy_of_the_masters():
    """``use_master_adamw`` on mcore's mixed-precision optimizer (bf16 model weights, fp32 masters; built without
    its constructor, which wants CUDA tensors): its step updates the masters with MasterAdamW, which writes each
    bf16 model weight, and mcore's copy of the masters into the model no longer runs."""
    from types import SimpleNamespace

    from megatron.core.optimizer.optimizer import Float16OptimizerWithFloat16Params
    from nemo_customizer.config import HyperparametersConfig
    from nemo_customizer.training import optim
    from nemo_customizer.training.bf16_adamw import MasterAdamW

    gen = torch.Generator().manual_seed(5)
    models = [torch.nn.Parameter(torch.randn(6, 4, generator=gen).to(torch.bfloat16)) for _ in range(2)]
    masters = [torch.nn.Parameter(m.detach().float()) for m in models]
    part = object.__new__(Float16OptimizerWithFloat16Params)
    part.config = SimpleNamespace(timers=None, reuse_grad_buf_for_mxfp8_param_ag=False)
    part.is_stub_optimizer = False
    part.float16_groups, part.fp32_from_float16_groups, part.fp32_from_fp32_groups = [models], [masters], [[]]
    part.optimizer = torch.optim.AdamW(masters, lr=1e-2)
    hp = HyperparametersConfig(learning_rate=1e-2)
    optim.use_master_adamw(part, hp)
    assert isinstance(part.optimizer, MasterAdamW) and part.optimizer.param_groups[0]["params"] == masters
    reference = [torch.nn.Parameter(m.detach().clone()) for m in masters]
    torch_adamw = torch.optim.AdamW(reference, lr=1e-2, betas=(hp.adam_beta1, hp.adam_beta2),
                                    weight_decay=hp.weight_decay)
    for p, r in zip(masters, reference):
        p.grad = r.grad = torch.randn(p.shape, generator=gen)
    part._dummy_overflow_buf = None
    assert "_copy_main_params_to_model_params" in vars(part)  # mcore's copy, replaced on this part only
    assert part.step_with_ready_grads()
    torch_adamw.step()
    for model, master, ref in zip(models, masters, reference):
        torch.testing.assert_close(master.detach(), ref.detach(), rtol=1e-6, atol=1e-8)
        assert torch.equal(model.detach(), master.detach().to(torch.bfloat16))
    # A part with fp32 model weights of its own (no bf16 copy to write) keeps its Adam.
    other = object.__new__(Float16OptimizerWithFloat16Params)
    other.float16_groups, other.fp32_from_float16_groups = [models], [masters]
    other.fp32_from_fp32_groups, other.optimizer = [[torch.nn.Parameter(torch.zeros(2))]], torch_adamw
    optim.use_master_adamw(other, hp)
    assert other.optimizer is torch_adamw
