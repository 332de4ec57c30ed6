"""Our Megatron model equals transformers' LlamaForCausalLM on the same weights."""

import pytest
import torch

from nemo_customizer.models.gpt import forward_logits

from _tiny import load_tiny_model, tiny_arch, write_tiny_checkpoint

pytestmark = pytest.mark.usefixtures("cpu_parallel")



@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("rope_scaling", [False, True])
def test_logits_match_transformers(tmp_path, tied, rope_scaling):
    arch = tiny_arch(tied=tied, rope_scaling=rope_scaling)
    hf = write_tiny_checkpoint(tmp_path, arch)
    ours = load_tiny_model(arch, tmp_path).eval()
    tokens = torch.randint(0, arch.vocab_size, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf(tokens).logits
        actual = forward_logits(ours, tokens)
    assert actual.shape == expected.shape
    assert (actual - expected).abs().max().item() <= 1e-4


def test_masked_loss_equals_full_cross_entropy(tmp_path):
    arch = tiny_arch()
    hf = write_tiny_checkpoint(tmp_path, arch)
    ours = load_tiny_model(arch, tmp_path).eval()
    gen = torch.Generator().manual_seed(2)
    tokens = torch.randint(0, arch.vocab_size, (2, 16), generator=gen)
    labels = torch.randint(0, arch.vocab_size, (2, 16), generator=gen)
    mask = torch.zeros(2, 16)
    mask[0, 10:] = 1
    mask[1, 3:7] = 1
    positions = torch.arange(16).expand_as(tokens)
    with torch.no_grad():
        losses = ours(tokens, positions, None, labels=labels, loss_mask=mask)
        logits = hf(tokens).logits
    full = torch.nn.functional.cross_entropy(logits.reshape(-1, arch.vocab_size), labels.reshape(-1),
                                             reduction="none").reshape(2, 16)
    assert losses.shape == (int(mask.sum()),)
    torch.testing.assert_close(losses.sum(), (full * mask).sum(), rtol=1e-5, atol=1e-5)
    # One loss per masked position, in the (s, b) order of mcore's hidden states
    torch.testing.assert_close(losses, full.t()[mask.t() > 0], rtol=1e-5, atol=1e-5)


def test_loss_positions_index_the_flattened_sequence_major_layout():
    from nemo_customizer.models.gpt import loss_positions

    mask = torch.tensor([[0, 1, 1, 0], [1, 0, 1, 0]])  # (b=2, s=4)
    index = loss_positions(mask, torch.device("cpu"))
    assert index.tolist() == [1, 2, 4, 5]  # (s, b) flattened: s*2 + b
    assert index.dtype == torch.int64


@pytest.mark.parametrize("weight_trains", [True, False], ids=["trained-weight", "frozen-weight"])
def test_chunked_loss_matches_plain_cross_entropy(monkeypatch, weight_trains):
    """Both loss-head paths (checkpointed chunks; gradient computed in forward for a frozen weight), chunked and
    not, give torch's cross-entropy and its gradients, for any upstream gradient."""
    from nemo_customizer.models import loss

    gen = torch.Generator().manual_seed(3)
    hidden = torch.randn(50, 8, generator=gen, requires_grad=True)
    weight = torch.randn(32, 8, generator=gen).requires_grad_(weight_trains)
    targets = torch.randint(0, 32, (50,), generator=gen)
    upstream = torch.rand(50, generator=gen)  # e.g. loss weights, 0 on padding positions
    expected = torch.nn.functional.cross_entropy(hidden @ weight.t(), targets, reduction="none")
    wrt = (hidden, weight) if weight_trains else (hidden,)
    expected_grads = torch.autograd.grad(expected, wrt, upstream)
    for chunk in (1024, 7):
        monkeypatch.setattr(loss, "LOSS_CHUNK_TOKENS", chunk)
        losses = loss.masked_token_losses(hidden, targets, weight)
        torch.testing.assert_close(losses, expected)
        for got, want in zip(torch.autograd.grad(losses, wrt, upstream), expected_grads):
            torch.testing.assert_close(got, want)
    with torch.no_grad():  # validation: plain losses
        torch.testing.assert_close(loss.masked_token_losses(hidden, targets, weight), expected)


def test_left_padded_batch_with_attention_mask_matches_single_rows(tmp_path):
    """Batched prompts of different lengths (left padding + key mask) give each row's own logits."""
    arch = tiny_arch()
    hf = write_tiny_checkpoint(tmp_path, arch)
    ours = load_tiny_model(arch, tmp_path).eval()
    gen = torch.Generator().manual_seed(5)
    rows = [torch.randint(0, arch.vocab_size, (n,), generator=gen) for n in (9, 4)]
    width = max(len(r) for r in rows)
    tokens = torch.zeros(len(rows), width, dtype=torch.long)
    pad = torch.ones(len(rows), width, dtype=torch.bool)  # True = padding (masked out)
    for i, row in enumerate(rows):
        tokens[i, width - len(row):] = row
        pad[i, width - len(row):] = False
    mask = pad[:, None, None, :]  # (b, 1, 1, sk): True where a key must not be attended
    with torch.no_grad():
        logits = ours(tokens, torch.arange(width).expand_as(tokens), mask, runtime_gather_output=True)
        for i, row in enumerate(rows):
            expected = hf(row[None]).logits[0]
            assert torch.isfinite(logits[i]).all()
            assert (logits[i, width - len(row):] - expected).abs().max().item() <= 1e-4


def _vocab_parallel_frozen_loss(rank: int, chunk: int) -> None:
    """At TP=2 each rank holds half the vocabulary of a frozen output weight: the losses and the hidden states'
    gradient (summed over ranks by the loss head) equal torch's cross-entropy over the whole vocabulary."""
    from nemo_customizer.distributed.parallel import destroy_parallel, initialize_parallel
    from nemo_customizer.models import loss

    loss.LOSS_CHUNK_TOKENS = chunk
    layout = initialize_parallel(tensor_parallel_size=2, pipeline_parallel_size=1, device=torch.device("cpu"), seed=0)
    try:
        gen = torch.Generator().manual_seed(5)
        hidden = torch.randn(50, 8, generator=gen, requires_grad=True)
        weight = torch.randn(32, 8, generator=gen) * 3  # peaked softmaxes: the max subtraction matters
        targets = torch.randint(0, 32, (50,), generator=gen)
        targets[:4] = torch.tensor([0, 15, 16, 31])  # both shards' first and last ids
        upstream = torch.rand(50, generator=gen)
        expected = torch.nn.functional.cross_entropy(hidden @ weight.t(), targets, reduction="none")
        (expected_grad,) = torch.autograd.grad(expected, hidden, upstream)
        losses = loss.masked_token_losses(hidden, targets, weight[16 * rank:16 * (rank + 1)])
        torch.testing.assert_close(losses, expected)
        (grad,) = torch.autograd.grad(losses, hidden, upstream)
        torch.testing.assert_close(grad, expected_grad)
    finally:
        destroy_parallel(layout)


@pytest.mark.parametrize("chunk", [1024, 7])
def test_frozen_output_loss_head_over_a_vocab_split_in_two(chunk):
    from _multiproc import run_world

    run_world(_vocab_parallel_frozen_loss, 2, chunk)
