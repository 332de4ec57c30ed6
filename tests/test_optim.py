"""The optimizer step: torch's fused Adam, and a step that computes, clips and checks on the device."""

import pytest
import torch

from nemo_customizer.training import optim


def test_fused_adam_steps_like_mcore_default(cpu_parallel):
    """torch's fused Adam kernel (on for every supported device, the CPU too) updates the weights as mcore's default
    foreach Adam does. (bf16 weights with fp32 master copies are CUDA-only in mcore; GPU runs cover them.)"""
    from _tiny import tiny_arch
    from nemo_customizer.config import HyperparametersConfig
    from nemo_customizer.models.gpt import build_gpt_model, transformer_config
    from nemo_customizer.training.wrap import wrap_for_training

    arch = tiny_arch()
    weights = []
    for fused in (False, True):
        torch.manual_seed(0)
        config = transformer_config(arch)
        ddp = wrap_for_training(build_gpt_model(arch, config, torch.device("cpu")), config)
        optimizer = optim.build_optimizer([ddp], HyperparametersConfig(learning_rate=1e-2), torch.float32,
                                         fused=fused)
        groups = [g for _, inner in optim.torch_adams(optimizer) for g in inner.param_groups]
        assert groups and all(bool(g["fused"]) is fused for g in groups)
        tokens = torch.randint(0, arch.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
        for _ in range(3):
            ddp.zero_grad_buffer()
            optimizer.zero_grad()
            logits = ddp(tokens, torch.arange(12).expand(2, -1), None)
            logits.float().square().mean().backward()
            optimizer.step()
        weights.append([p.detach().float().clone() for p in ddp.parameters()])
        steps = [s["step"] for _, inner in optim.torch_adams(optimizer) for s in inner.state.values()]
        assert steps and all(float(s) == 3 for s in steps)
    for fused_weight, reference in zip(weights[1], weights[0]):
        torch.testing.assert_close(fused_weight, reference, rtol=1e-5, atol=1e-6)


def test_fused_adam_only_for_contiguous_parameters():
    from types import SimpleNamespace

    full = torch.randn(4, 6)
    strided = torch.nn.Parameter(full[:, :3])  # a column slice: the fused kernel would misread its layout
    dense = torch.nn.Parameter(torch.randn(3))
    inner = torch.optim.AdamW([{"params": [dense]}, {"params": [strided]}])
    optim._use_fused_adam(SimpleNamespace(optimizer=inner))
    assert [bool(g["fused"]) for g in inner.param_groups] == [True, False]


def _tiny_job(fused: bool, clip_grad: float):
    from _tiny import tiny_arch
    from nemo_customizer.config import HyperparametersConfig
    from nemo_customizer.models.gpt import build_gpt_model, transformer_config
    from nemo_customizer.training.wrap import wrap_for_training

    torch.manual_seed(0)
    arch = tiny_arch()
    config = transformer_config(arch)
    ddp = wrap_for_training(build_gpt_model(arch, config, torch.device("cpu")), config)
    hp = HyperparametersConfig(learning_rate=1e-2, clip_grad=clip_grad)
    optimizer = optim.build_optimizer([ddp], hp, torch.float32, fused=fused)
    return ddp, optimizer, optim.build_scheduler(optimizer, hp, 10), arch


def _micro_batches(arch, seed: int):
    from nemo_customizer.data import collate
    from nemo_customizer.data.examples import TokenizedExample

    gen = torch.Generator().manual_seed(seed)
    examples = [TokenizedExample(torch.randint(0, arch.vocab_size, (n,), generator=gen).tolist(),
                                 [0] * 3 + [1] * (n - 3)) for n in (9, 14)]
    return [collate(examples, pad_id=0)]


@pytest.mark.parametrize("clip_grad", [0.05, 0.0])
def test_device_side_step_equals_host_side_step(cpu_parallel, clip_grad):
    """With fused Adam the clip factor and the non-finite check stay on the device (``grad_scale``/``found_inf``);
    the unfused path reads the norm and clips on the host as mcore does. Both give the same norms and weights
    (clip 0.05 clips every step; 0 never clips)."""
    from nemo_customizer.training.step import train_step

    runs = []
    for fused in (True, False):
        ddp, optimizer, scheduler, arch = _tiny_job(fused, clip_grad)
        assert (optim.fused_adams(optimizer) is not None) is fused
        results = [train_step(ddp, optimizer, scheduler, _micro_batches(arch, seed), torch.device("cpu"))
                   for seed in range(3)]
        moments = [s[k] for _, inner in optim.torch_adams(optimizer) for s in inner.state.values()
                   for k in ("exp_avg", "exp_avg_sq")]
        runs.append((results, [p.detach().clone() for p in ddp.parameters()], moments))
    (fast, fast_weights, fast_moments), (host, host_weights, host_moments) = runs
    for a, b in zip(fast, host):
        assert a.loss == pytest.approx(b.loss, rel=1e-5) and a.loss_tokens == b.loss_tokens > 0
        assert a.grad_norm == pytest.approx(b.grad_norm, rel=1e-5)
        assert a.real_tokens == b.real_tokens == 8 + 13 and not a.skipped
    if clip_grad:
        assert all(r.grad_norm > 10 * clip_grad for r in fast)  # the clip was active
    # Adam's update hardly depends on the gradients' scale; its moments do (a missing clip: off by norm / clip).
    assert len(fast_moments) == len(host_moments) > 0
    for a, b in zip(fast_moments, host_moments):
        assert (a - b).norm() <= 1e-4 * b.norm()
    for a, b in zip(fast_weights, host_weights):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("fused", [True, False])
def test_non_finite_gradient_leaves_weights_and_adam_state_untouched(cpu_parallel, monkeypatch, fused):
    from nemo_customizer.training import step as step_module

    ddp, optimizer, scheduler, arch = _tiny_job(fused, 1.0)
    cpu = torch.device("cpu")
    step_module.train_step(ddp, optimizer, scheduler, _micro_batches(arch, 0), cpu)
    weights = [p.detach().clone() for p in ddp.parameters()]
    state = [{k: v.clone() for k, v in s.items()} for _, inner in optim.torch_adams(optimizer)
             for s in inner.state.values()]
    original = step_module.forward_backward

    def poisoned(model, micro_batches, device, forward_only, **kwargs):
        out = original(model, micro_batches, device, forward_only, **kwargs)
        next(p for p in model.parameters() if p.requires_grad).main_grad.view(-1)[0] = float("inf")
        return out

    monkeypatch.setattr(step_module, "forward_backward", poisoned)
    with pytest.raises(step_module.NonFiniteStep, match="gradient norm is"):
        step_module.train_step(ddp, optimizer, scheduler, _micro_batches(arch, 1), cpu)
    assert all(p.equal(w) for p, w in zip(ddp.parameters(), weights))
    after = [s for _, inner in optim.torch_adams(optimizer) for s in inner.state.values()]
    assert len(after) == len(state) > 0
    assert all(a[k].equal(b[k]) for a, b in zip(after, state) for k in b)
    # The next clean step updates again (no stale grad_scale/found_inf left on the optimizer).
    monkeypatch.setattr(step_module, "forward_backward", original)
    step_module.train_step(ddp, optimizer, scheduler, _micro_batches(arch, 2), cpu)
    assert not all(p.equal(w) for p, w in zip(ddp.parameters(), weights))


def test_step_gradient_norm_is_that_of_the_token_mean_loss(cpu_parallel):
    """The step divides the summed gradients by the global loss-token count itself (mcore's finalization no longer
    does): the logged norm must be the norm of the gradient of the mean token loss over both micro batches,
    computed here with plain autograd on an identical model."""
    import torch.nn.functional as F
    from _tiny import tiny_arch
    from nemo_customizer.models.gpt import build_gpt_model, forward_logits, transformer_config
    from nemo_customizer.training.step import train_step

    ddp, optimizer, scheduler, arch = _tiny_job(True, 0.0)
    micro_batches = _micro_batches(arch, 0) + _micro_batches(arch, 1)
    result = train_step(ddp, optimizer, scheduler, micro_batches, torch.device("cpu"))

    torch.manual_seed(0)  # the weights _tiny_job built
    reference = build_gpt_model(tiny_arch(), transformer_config(tiny_arch()), torch.device("cpu"))
    losses = []
    for batch in micro_batches:
        logits = forward_logits(reference, batch["tokens"], batch["position_ids"]).float()
        mask = batch["loss_mask"].bool()
        losses.append(F.cross_entropy(logits[mask], batch["labels"][mask], reduction="none"))
    loss = torch.cat(losses).mean()
    loss.backward()
    norm = torch.nn.utils.get_total_norm([p.grad for p in reference.parameters() if p.grad is not None])
    assert result.loss_tokens == torch.cat(losses).numel()
    assert result.loss == pytest.approx(loss.item(), rel=1e-5)
    assert result.grad_norm == pytest.approx(norm.item(), rel=1e-4)


def test_step_puts_a_model_left_in_eval_mode_back_in_training_mode(cpu_parallel):
    """``train_step`` skips the walk over every module when the model is already training (host time the GPU waits
    for), but a model left in eval mode (validation, generation) must train with dropout and the like on again."""
    from nemo_customizer.training.step import train_step

    ddp, optimizer, scheduler, arch = _tiny_job(True, 0.0)
    ddp.eval()
    train_step(ddp, optimizer, scheduler, _micro_batches(arch, 0), torch.device("cpu"))
    assert all(module.training for module in ddp.modules())


def test_trained_linear_weights_add_their_gradients_straight_into_the_ddp_buffers(cpu_parallel):
    """Every mcore linear layer whose weight trains accumulates its weight gradient into DDP's ``main_grad`` inside
    the GEMM (gradient-accumulation fusion); over two micro batches each parameter's buffer holds exactly the
    gradient plain autograd gives an identical model."""
    import torch.nn.functional as F
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
    from _tiny import tiny_arch
    from nemo_customizer.models.gpt import build_gpt_model, forward_logits, transformer_config
    from nemo_customizer.training.step import forward_backward

    ddp, _, _, arch = _tiny_job(True, 0.0)
    linears = [m for m in ddp.modules() if isinstance(m, (ColumnParallelLinear, RowParallelLinear))
               and m.weight is not None]
    assert linears and all(m.gradient_accumulation_fusion for m in linears)
    micro_batches = _micro_batches(arch, 0) + _micro_batches(arch, 1)
    ddp.zero_grad_buffer()
    forward_backward(ddp, micro_batches, torch.device("cpu"), forward_only=False)

    torch.manual_seed(0)  # the weights _tiny_job built
    reference = build_gpt_model(tiny_arch(), transformer_config(tiny_arch()), torch.device("cpu"))
    for batch in micro_batches:
        logits = forward_logits(reference, batch["tokens"], batch["position_ids"]).float()
        mask = batch["loss_mask"].bool()
        F.cross_entropy(logits[mask], batch["labels"][mask], reduction="sum").backward()
    expected = dict(reference.named_parameters())
    for name, param in ddp.module.named_parameters():
        torch.testing.assert_close(param.main_grad, expected[name].grad, rtol=1e-4, atol=1e-6, msg=name)


def test_frozen_linear_weights_keep_mcore_s_unfused_path(cpu_parallel):
    """LoRA: the base weights compute no weight gradient, so their layers are left as mcore built them."""
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
    from _tiny import tiny_arch
    from nemo_customizer.models.gpt import build_gpt_model, transformer_config
    from nemo_customizer.training.wrap import wrap_for_training

    arch = tiny_arch()
    config = transformer_config(arch)
    model = build_gpt_model(arch, config, torch.device("cpu"))
    for name, param in model.named_parameters():
        param.requires_grad_("linear_qkv" in name)
    wrap_for_training(model, config)
    fusion = {type(m).__name__ + ("-trained" if m.weight.requires_grad else "-frozen"): m.gradient_accumulation_fusion
              for m in model.modules() if isinstance(m, (ColumnParallelLinear, RowParallelLinear))
              and m.weight is not None}
    assert fusion == {"ColumnParallelLinear-trained": True, "ColumnParallelLinear-frozen": False,
                      "RowParallelLinear-frozen": False}


def test_weight_gradient_accumulation_of_bf16_inputs_into_fp32_buffers():
    """The CPU branch of the fused accumulation (no mixed-dtype GEMM there): bf16 inputs, fp32 buffer."""
    from nemo_customizer.training.wrap import _WeightGradAccumulation

    gen = torch.Generator().manual_seed(0)
    total_input = torch.randn(12, 5, generator=gen).bfloat16()
    grad_output = torch.randn(12, 3, generator=gen).bfloat16()
    main_grad = torch.randn(3, 5, generator=gen)
    expected = main_grad + grad_output.float().t() @ total_input.float()
    _WeightGradAccumulation.wgrad_gemm_accum_fp32(total_input, grad_output, main_grad)
    torch.testing.assert_close(main_grad, expected, rtol=1e-2, atol=1e-2)
