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
