"""RoPE's hand-written backward (``RotateHalf``, the Triton kernel's arithmetic in torch) against autograd."""

import torch

from nemo_customizer.models.rope import RotateHalf, _rotate


def _inputs(tokens=37, heads=4, kv_heads=2, head_dim=8):
    gen = torch.Generator().manual_seed(0)
    # query and key as mcore leaves them: strided views of one fused projection output
    mixed = torch.randn(tokens, kv_heads, (heads // kv_heads + 2) * head_dim, generator=gen, dtype=torch.float64)
    query, key, _ = torch.split(mixed, [heads // kv_heads * head_dim, head_dim, head_dim], dim=2)
    query = query.reshape(tokens, heads, head_dim)
    # Unequal halves of cos/sin: the general rotation, so a backward that assumed them equal would fail.
    cos = torch.randn(tokens, 1, head_dim, generator=gen, dtype=torch.float64)
    sin = torch.randn(tokens, 1, head_dim, generator=gen, dtype=torch.float64)
    return query.detach().requires_grad_(), key.detach().requires_grad_(), cos, sin


def test_rotate_half_function_equals_autograd_of_the_formula():
    query, key, cos, sin = _inputs()
    gen = torch.Generator().manual_seed(1)
    upstream = [torch.randn(t.shape, generator=gen, dtype=torch.float64) for t in (query, key)]
    ours = RotateHalf.apply(query, key, cos, sin)
    ours_grads = torch.autograd.grad(ours, (query, key), upstream)
    reference = _rotate(query, key, cos, sin)
    reference_grads = torch.autograd.grad(reference, (query, key), upstream)
    for a, b in zip((*ours, *ours_grads), (*reference, *reference_grads)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_rotate_half_function_passes_gradcheck():
    query, key, cos, sin = _inputs(tokens=5, heads=2, kv_heads=1, head_dim=4)
    assert torch.autograd.gradcheck(lambda q, k: RotateHalf.apply(q, k, cos, sin), (query, key))
