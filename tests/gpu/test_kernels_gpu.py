"""The GPU-only kernels of the model (compiled with ``torch.compile`` or written in Triton) against their eager or
fp32 reference on the same inputs, bf16: RMSNorm, cross-entropy and the loss head, RoPE, SwiGLU."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from _relative_error import worst_rel

pytestmark = pytest.mark.gpu

VOCAB = 128256  # Llama 3's


@pytest.mark.parametrize("tokens", [4096, 1531])  # two shapes: the compiled graph is dynamic, not specialized
def test_compiled_rms_norm_matches_eager(generator, tokens):
    """Forward, d_x, d_w."""
    from nemo_customizer.models.norm import fused_rms_norm, rms_norm

    x = torch.randn(tokens, 2048, generator=generator).cuda().to(torch.bfloat16).requires_grad_()
    w = (torch.rand(2048, generator=generator) + 0.5).cuda().to(torch.bfloat16).requires_grad_()

    def outputs_and_grads(fn):
        out = fn(x, w)
        return [out, *torch.autograd.grad(out.float().square().sum(), (x, w))]

    worst = worst_rel(zip(outputs_and_grads(fused_rms_norm.compiled(eps=1e-5)),
                          outputs_and_grads(lambda x, w: rms_norm(x, w, 1e-5))))
    assert worst <= 2e-2


@dataclass(frozen=True)
class CrossEntropyCase:
    logits: torch.Tensor
    """(T, V) bf16, a leaf that requires grad."""
    targets: torch.Tensor
    """(T,)"""
    losses: torch.Tensor
    """(T,) eager cross-entropy in fp32: the reference."""
    grad: torch.Tensor
    """(T, V) the reference's gradient of ``losses.sum()`` with respect to the logits."""


@pytest.fixture(params=["one loss chunk", 700])
def cross_entropy(request, generator) -> CrossEntropyCase:
    from nemo_customizer.models.loss import LOSS_CHUNK_TOKENS, _cross_entropy_fp32

    tokens = LOSS_CHUNK_TOKENS if request.param == "one loss chunk" else request.param
    logits = (torch.randn(tokens, VOCAB, generator=generator) * 3).cuda().to(torch.bfloat16).requires_grad_()
    targets = torch.randint(0, VOCAB, (tokens,), generator=generator).cuda()
    losses = _cross_entropy_fp32(logits, targets)  # eager
    (grad,) = torch.autograd.grad(losses.sum(), logits)
    return CrossEntropyCase(logits, targets, losses.detach(), grad)


def test_compiled_cross_entropy_matches_eager_fp32(cross_entropy):
    """bf16 logits: loss and gradient."""
    from nemo_customizer.models.loss import _fused_cross_entropy

    losses = _fused_cross_entropy.compiled()(cross_entropy.logits, cross_entropy.targets)
    (grad,) = torch.autograd.grad(losses.sum(), cross_entropy.logits)
    assert worst_rel([(losses, cross_entropy.losses), (grad.float(), cross_entropy.grad.float())]) <= 2e-2


def test_compiled_cross_entropy_with_gradient_in_forward_matches_autograd(cross_entropy):
    """The frozen-output-weight loss head computes the logits' gradient in forward, compiled."""
    from nemo_customizer.models.loss import _fused_cross_entropy_and_grad

    losses, grad = _fused_cross_entropy_and_grad.compiled()(cross_entropy.logits.detach(), cross_entropy.targets)
    assert worst_rel([(losses, cross_entropy.losses), (grad.float(), cross_entropy.grad.float())]) <= 2e-2


def test_triton_cross_entropy_with_gradient_matches_autograd(cross_entropy):
    """What the frozen-output loss head runs on CUDA: the Triton kernel (models.loss_kernel)."""
    from nemo_customizer.models.loss import _kernel_cross_entropy_and_grad

    losses, grad = _kernel_cross_entropy_and_grad()(cross_entropy.logits.detach(), cross_entropy.targets)
    assert worst_rel([(losses, cross_entropy.losses), (grad.float(), cross_entropy.grad.float())]) <= 2e-2


SOFTCAP = 5.0  # Gemma 2's final-logit softcapping, a cap the logits here (std 3) often reach


@pytest.mark.parametrize("kernel", ["triton", "compiled"])
def test_softcapped_cross_entropy_with_gradient_matches_autograd(cross_entropy, kernel):
    """The frozen-output-weight loss head's cross-entropy of softcapped logits (the cap inside the kernel) against
    autograd through the eager cap and cross-entropy in fp32."""
    from nemo_customizer.models.loss import _cross_entropy_fp32, _fused_cross_entropy_and_grad, \
        _kernel_cross_entropy_and_grad

    logits = cross_entropy.logits.detach().requires_grad_()
    expected = _cross_entropy_fp32(logits, cross_entropy.targets, softcap=SOFTCAP)
    (expected_grad,) = torch.autograd.grad(expected.sum(), logits)
    if kernel == "triton":
        losses, grad = _kernel_cross_entropy_and_grad()(logits.detach(), cross_entropy.targets, softcap=SOFTCAP)
    else:
        losses, grad = _fused_cross_entropy_and_grad.compiled(softcap=SOFTCAP)(logits.detach(), cross_entropy.targets)
    uncapped, _ = _kernel_cross_entropy_and_grad()(logits.detach(), cross_entropy.targets)
    assert worst_rel([(uncapped, expected.detach())]) > 0.1  # the cap changes the losses
    assert worst_rel([(losses, expected.detach()), (grad.float(), expected_grad.float())]) <= 2e-2


@pytest.mark.parametrize("softcap", [None, 2.0], ids=["uncapped", "softcapped"])
def test_loss_head_matches_fp32_autograd(generator, softcap):
    """The training loss head on CUDA (bf16, the Triton cross-entropy, gradients computed in forward chunk by chunk)
    with a trained output weight and position weights, against fp32 autograd over the whole logits: losses, d_hidden,
    d_weight; with Gemma 2's softcapped logits too."""
    from nemo_customizer.distributed.parallel import destroy_parallel, initialize_parallel
    from nemo_customizer.models.loss import masked_token_losses

    tokens, hidden_size = 2500, 2048  # three loss chunks, the last one partial
    hidden = torch.randn(tokens, hidden_size, generator=generator).cuda().to(torch.bfloat16).requires_grad_()
    weight = (torch.randn(VOCAB, hidden_size, generator=generator) * 0.05).cuda().to(torch.bfloat16).requires_grad_()
    targets = torch.randint(0, VOCAB, (tokens,), generator=generator).cuda()
    position_weights = (torch.rand(tokens, generator=generator) > 0.1).float().cuda()  # 0: a graph's padding
    layout = initialize_parallel(tensor_parallel_size=1, pipeline_parallel_size=1, device=torch.device("cuda"), seed=0)
    try:
        losses = masked_token_losses(hidden, targets, weight, position_weights, softcap=softcap)
        ours = [losses, *torch.autograd.grad(losses.sum(), (hidden, weight))]
    finally:
        destroy_parallel(layout)
    hidden32, weight32 = (t.detach().float().requires_grad_() for t in (hidden, weight))
    logits = hidden32 @ weight32.t()
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    reference = torch.nn.functional.cross_entropy(logits, targets, reduction="none") * position_weights
    expected = [reference, *torch.autograd.grad(reference.sum(), (hidden32, weight32))]
    assert worst_rel((a.float(), b) for a, b in zip(ours, expected)) <= 2e-2


def test_compiled_rope_matches_eager(generator):
    """q, k, d_q, d_k; 32 query and 8 key heads."""
    from nemo_customizer.models.rope import _fused_rotate, _rotate

    q = torch.randn(3000, 32, 64, generator=generator).cuda().to(torch.bfloat16).requires_grad_()
    k = torch.randn(3000, 8, 64, generator=generator).cuda().to(torch.bfloat16).requires_grad_()
    angles = torch.rand(3000, 1, 64, generator=generator).cuda() * 6.28
    cos, sin = angles.cos().to(torch.bfloat16), angles.sin().to(torch.bfloat16)
    upstream = [torch.randn(t.shape, generator=generator).cuda().to(torch.bfloat16) for t in (q, k)]

    def outputs_and_grads(fn):
        outs = fn(q, k, cos, sin)
        grads = torch.autograd.grad(outs, (q, k), upstream)
        return [t.float() for t in (*outs, *grads)]

    fused = outputs_and_grads(_fused_rotate.compiled())
    eager = outputs_and_grads(_rotate)  # autograd through the eager formula
    assert worst_rel(zip(fused, eager)) <= 2e-2


@pytest.mark.parametrize("tokens, head_dim", [(4096, 64), (1531, 128)])
def test_triton_rope_matches_fp32_autograd(generator, tokens, head_dim):
    """The Triton RoPE kernel (``models.rope.rotate`` on CUDA) against autograd through the fp32 eager formula, on
    query/key views of a fused projection output as mcore passes them: q, k, d_q, d_k."""
    from nemo_customizer.models.rope import _rotate, rotate

    mixed = torch.randn(tokens, 8, 6 * head_dim, generator=generator).cuda().to(torch.bfloat16)
    query, key, _ = torch.split(mixed, [4 * head_dim, head_dim, head_dim], dim=2)
    query = query.reshape(tokens, 32, head_dim).detach().requires_grad_()
    key = key.detach().requires_grad_()
    angles = torch.rand(tokens, 1, head_dim, generator=generator).cuda() * 6.28
    cos, sin = angles.cos().to(torch.bfloat16), angles.sin().to(torch.bfloat16)
    upstream = [torch.randn(t.shape, generator=generator).cuda().to(torch.bfloat16) for t in (query, key)]
    outs = rotate(query, key, cos, sin)
    assert outs[0].grad_fn is not None and "RotateHalf" in type(outs[0].grad_fn).__name__, "not the kernel path"
    ours = [*outs, *torch.autograd.grad(outs, (query, key), upstream)]
    fp32 = [t.detach().float().requires_grad_() for t in (query, key)]
    ref_outs = _rotate(*fp32, cos.float(), sin.float())
    reference = [*ref_outs, *torch.autograd.grad(ref_outs, fp32, [u.float() for u in upstream])]
    assert worst_rel((a.float(), b) for a, b in zip(ours, reference)) <= 1e-2


@pytest.mark.parametrize("rows, width", [(4096, 8192), (1531, 14336)])
def test_triton_swiglu_matches_fp32_autograd(generator, rows, width):
    """The MLP's SwiGLU module on CUDA (Triton, both directions) against autograd of the fp32 formula: out, d_x."""
    from nemo_customizer.models.swiglu import SwiGLU

    x = (torch.randn(rows, 1, 2 * width, generator=generator) * 2).cuda().to(torch.bfloat16).requires_grad_()
    upstream = torch.randn(rows, 1, width, generator=generator).cuda().to(torch.bfloat16)
    out = SwiGLU()(x)
    assert "SwiGLUFunction" in type(out.grad_fn).__name__, "not the kernel path"
    ours = [out, *torch.autograd.grad(out, x, upstream)]
    x32 = x.detach().float().requires_grad_()
    gate, up = x32.chunk(2, dim=-1)
    ref = torch.nn.functional.silu(gate) * up
    reference = [ref, *torch.autograd.grad(ref, x32, upstream.float())]
    assert worst_rel((a.float(), b) for a, b in zip(ours, reference)) <= 1e-2
