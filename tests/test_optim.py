"""The optimizer's gradient-norm clipping: mcore's host-syncing fallback norm is replaced by a device-side one."""

import pytest
import torch
from megatron.core import utils as mcore_utils
from megatron.core.optimizer import clip_grads

from nemo_customizer.training import optim


@pytest.mark.usefixtures("cpu_parallel")  # mcore's fallback creates its result on "cuda"; the CPU patches redirect
def test_device_grad_norm_equals_mcore_fallback():
    gen = torch.Generator().manual_seed(0)
    grads = [torch.randn(shape, generator=gen) for shape in ((3, 5), (7,), (2, 2, 2))]
    ours, _ = optim._device_l2_norm(2048 * 32, None, [grads], False)
    theirs, _ = mcore_utils.local_multi_tensor_l2_norm(2048 * 32, None, [grads], False)
    assert ours.shape == (1,) and ours.dtype == torch.float32
    torch.testing.assert_close(ours, theirs.to(ours.device), rtol=1e-6, atol=0)


def test_the_fallback_is_replaced():
    # Without TE/apex (CI, and the torch-native GPU path) mcore picks its local fallback; if mcore renames or moves
    # it, the replacement silently stops applying and every step syncs once per gradient tensor again.
    optim._use_device_grad_norm()
    assert clip_grads.l2_norm_impl is optim._device_l2_norm


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
