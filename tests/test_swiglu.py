"""Our SwiGLU activation's hand-written backward (Triton on CUDA; the same arithmetic in torch here) against autograd
of ``silu(gate) * up``."""

import torch
import torch.nn.functional as F

from nemo_customizer.models.swiglu import SwiGLU, SwiGLUFunction


def test_swiglu_function_equals_autograd_of_the_formula():
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(7, 3, 2 * 24, generator=gen, dtype=torch.float64) * 3).requires_grad_()
    upstream = torch.randn(7, 3, 24, generator=gen, dtype=torch.float64)
    ours = SwiGLUFunction.apply(x)  # on CPU: the kernels' arithmetic in torch
    (ours_grad,) = torch.autograd.grad(ours, x, upstream)
    gate, up = x.chunk(2, dim=-1)
    reference = F.silu(gate) * up
    (reference_grad,) = torch.autograd.grad(reference, x, upstream)
    torch.testing.assert_close(ours, reference, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ours_grad, reference_grad, rtol=1e-12, atol=1e-12)


def test_swiglu_function_passes_gradcheck():
    x = torch.randn(4, 2 * 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1)).requires_grad_()
    assert torch.autograd.gradcheck(SwiGLUFunction.apply, (x,))


def test_the_model_mlp_uses_it_on_the_whole_fc1_output(cpu_parallel):
    """mcore's MLP calls the spec's activation module only with ``use_te_activation_func``; without it, it would
    apply plain silu to the fused gate|up output (twice the width): the model parity tests would catch the numbers,
    this names the cause."""
    from _tiny import tiny_arch
    from nemo_customizer.models.gpt import build_gpt_model, transformer_config

    arch = tiny_arch()
    model = build_gpt_model(arch, transformer_config(arch), torch.device("cpu"))
    mlp = model.decoder.layers[0].mlp
    assert isinstance(mlp.activation_func, SwiGLU)
