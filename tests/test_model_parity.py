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
@pytest.mark.parametrize("weighted", [True, False], ids=["position-weights", "unweighted"])
@pytest.mark.parametrize("softcap", [None, 2.0], ids=["uncapped", "softcapped"])
def test_chunked_loss_matches_plain_cross_entropy(monkeypatch, weight_trains, weighted, softcap):
    """The loss head (gradients computed in forward, chunk by chunk), chunked and not, gives torch's cross-entropy
    and its gradients: with a frozen weight for any upstream gradient, with a trained one for the summed loss (any
    constant upstream gradient), with and without position weights (0 on a graph's padding positions), with and
    without softcapped logits (Gemma 2's ``tanh(logit / cap) * cap``, a cap below most logits here)."""
    from nemo_customizer.models import loss

    gen = torch.Generator().manual_seed(3)
    hidden = torch.randn(50, 8, generator=gen, requires_grad=True)
    weight = torch.randn(32, 8, generator=gen).requires_grad_(weight_trains)
    targets = torch.randint(0, 32, (50,), generator=gen)
    position_weights = torch.rand(50, generator=gen) if weighted else None
    if weighted:
        position_weights[-5:] = 0.0
    # A trained weight's gradient supports only sums of the losses (here times 3: a loss scale).
    upstream = torch.full((50,), 3.0) if weight_trains else torch.rand(50, generator=gen)
    logits = hidden @ weight.t()
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    expected = torch.nn.functional.cross_entropy(logits, targets, reduction="none")
    if weighted:
        expected = expected * position_weights
    wrt = (hidden, weight) if weight_trains else (hidden,)
    expected_grads = torch.autograd.grad(expected, wrt, upstream)
    for chunk in (1024, 7):
        monkeypatch.setattr(loss, "LOSS_CHUNK_TOKENS", chunk)
        losses = loss.masked_token_losses(hidden, targets, weight, position_weights, softcap=softcap)
        torch.testing.assert_close(losses, expected)
        for got, want in zip(torch.autograd.grad(losses, wrt, upstream), expected_grads):
            torch.testing.assert_close(got, want)
    with torch.no_grad():  # validation: plain losses, chunk by chunk (7 here); and the argmax hits
        torch.testing.assert_close(loss.masked_token_losses(hidden, targets, weight, position_weights,
                                                            softcap=softcap), expected)
        targets[::3] = logits.argmax(dim=-1)[::3]  # some hits
        losses, hits = loss.masked_token_losses(hidden, targets, weight, position_weights, softcap=softcap,
                                                token_hits=True)
        assert hits.dtype == torch.bool and 17 <= int(hits.sum()) < 50
        assert torch.equal(hits, logits.argmax(dim=-1) == targets)  # the softcap keeps the argmax
    with pytest.raises(ValueError, match="without gradients"):
        loss.masked_token_losses(hidden, targets, weight, token_hits=True)


def _greedy_in_places(hf, ids: torch.Tensor, every: int) -> torch.Tensor:
    """``ids`` with every ``every``-th next token replaced by transformers' argmax prediction there (so that a share
    of the targets are hits), one position at a time: a prediction depends on the tokens before it only."""
    ids = ids.clone()
    with torch.no_grad():
        for i in range(0, len(ids) - 1, every):
            ids[i + 1] = hf(ids[None, :i + 1]).logits[0, -1].argmax()
    return ids


def test_validation_token_accuracy_equals_transformers_argmax(tmp_path, monkeypatch):
    """Validation's report (``TOKEN_MEAN.validation`` through mcore's schedule, two steps, two rows in one micro
    batch, loss-head chunks of 5 positions) counts the loss-masked targets that are the argmax of transformers'
    logits: ``mean_token_accuracy`` as TRL computes it."""
    from nemo_customizer.data import TokenizedExample, collate
    from nemo_customizer.models import loss
    from nemo_customizer.training.objective import TOKEN_MEAN
    from nemo_customizer.training.step import validation_totals

    monkeypatch.setattr(loss, "LOSS_CHUNK_TOKENS", 5)
    arch = tiny_arch()
    hf = write_tiny_checkpoint(tmp_path, arch)
    ours = load_tiny_model(arch, tmp_path)
    gen = torch.Generator().manual_seed(6)
    examples, hits, tokens, loss_sum = [], 0, 0, 0.0
    for n, prompt in ((12, 3), (7, 2), (15, 6)):
        ids = _greedy_in_places(hf, torch.randint(0, arch.vocab_size, (n,), generator=gen), every=2)
        mask = torch.tensor([0] * prompt + [1] * (n - prompt))
        examples.append(TokenizedExample(ids.tolist(), mask.tolist()))
        with torch.no_grad():
            logits = hf(ids[None]).logits[0, :-1]  # predictions of ids[1:]
        targets, at_loss = ids[1:], mask[1:] > 0
        hits += int((logits.argmax(dim=-1) == targets)[at_loss].sum())
        tokens += int(at_loss.sum())
        loss_sum += float(torch.nn.functional.cross_entropy(logits[at_loss], targets[at_loss], reduction="sum"))
    batches = [[collate(examples[:2], pad_id=0)], [collate(examples[2:], pad_id=0)]]
    total, count, counted_hits = validation_totals(ours, batches, torch.device("cpu"), TOKEN_MEAN.validation)
    assert (count, counted_hits) == (tokens, hits) and 0 < hits < tokens
    assert total == pytest.approx(loss_sum, rel=1e-5)
    assert TOKEN_MEAN.validation.metrics([counted_hits], count, prefix="val_") == \
        {"val_mean_token_accuracy": pytest.approx(hits / tokens)}
    assert TOKEN_MEAN.metrics([], count) == {}  # training steps report no accuracy


def test_trained_output_weight_refuses_an_upstream_gradient_that_differs_by_position(monkeypatch):
    """The output weight's gradient is summed over positions in forward; backward can only scale it, so an upstream
    gradient that is not one constant must fail, not give a wrong gradient."""
    from nemo_customizer.models import loss

    monkeypatch.setattr(loss, "LOSS_CHUNK_TOKENS", 7)
    gen = torch.Generator().manual_seed(4)
    hidden = torch.randn(20, 8, generator=gen, requires_grad=True)
    weight = torch.randn(32, 8, generator=gen, requires_grad=True)
    losses = loss.masked_token_losses(hidden, torch.randint(0, 32, (20,), generator=gen), weight)
    with pytest.raises(RuntimeError, match="same upstream gradient at every position"):
        torch.autograd.grad(losses, (hidden, weight), torch.rand(20, generator=gen))


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


def _vocab_parallel_loss(rank: int, chunk: int, weight_trains: bool) -> None:
    """At TP=2 each rank holds half the vocabulary of the output weight: the losses, the hidden states' gradient
    (summed over ranks by the loss head) and, when the weight trains, each rank's shard of its gradient equal
    torch's cross-entropy over the whole vocabulary; without gradients the argmax hits equal the whole
    vocabulary's (TP=1's), ties included."""
    from nemo_customizer.distributed.parallel import destroy_parallel, initialize_parallel
    from nemo_customizer.models import loss

    loss.LOSS_CHUNK_TOKENS = chunk
    layout = initialize_parallel(tensor_parallel_size=2, pipeline_parallel_size=1, device=torch.device("cpu"), seed=0)
    try:
        for softcap in (None, 5.0):  # Gemma 2's softcapped logits too, a cap below the largest logits here
            gen = torch.Generator().manual_seed(5)
            hidden = torch.randn(50, 8, generator=gen, requires_grad=True)
            weight = (torch.randn(32, 8, generator=gen) * 3).requires_grad_(weight_trains)  # peaked softmaxes
            targets = torch.randint(0, 32, (50,), generator=gen)
            targets[:4] = torch.tensor([0, 15, 16, 31])  # both shards' first and last ids
            position_weights = torch.rand(50, generator=gen)
            upstream = torch.full((50,), 2.0) if weight_trains else torch.rand(50, generator=gen)
            logits = hidden @ weight.t()
            if softcap is not None:
                logits = torch.tanh(logits / softcap) * softcap
            expected = torch.nn.functional.cross_entropy(logits, targets, reduction="none") * position_weights
            wrt = (hidden, weight) if weight_trains else (hidden,)
            expected_grads = torch.autograd.grad(expected, wrt, upstream)
            shard = weight.detach()[16 * rank:16 * (rank + 1)].requires_grad_(weight_trains)
            losses = loss.masked_token_losses(hidden, targets, shard, position_weights, softcap=softcap)
            torch.testing.assert_close(losses, expected)
            grads = torch.autograd.grad(losses, (hidden, shard) if weight_trains else (hidden,), upstream)
            torch.testing.assert_close(grads[0], expected_grads[0])
            if weight_trains:
                torch.testing.assert_close(grads[1], expected_grads[1][16 * rank:16 * (rank + 1)])
            with torch.no_grad():  # validation: mcore's vocab-parallel cross-entropy; the argmax over both shards
                torch.testing.assert_close(loss.masked_token_losses(hidden, targets, shard, position_weights,
                                                                    softcap=softcap), expected)
                targets[::3] = logits.argmax(dim=-1)[::3]  # hits in both shards
                losses, hits = loss.masked_token_losses(hidden, targets, shard, position_weights, softcap=softcap,
                                                        token_hits=True)
                assert torch.equal(hits, logits.argmax(dim=-1) == targets) and 17 <= int(hits.sum()) < 50
        # Equal maxima in both shards: torch.argmax's first one (id 3, not 19) is the prediction.
        tied = torch.zeros(2, 32)
        tied[:, [3, 19]] = 1.0
        hits = loss.argmax_hits(tied[:, 16 * rank:16 * (rank + 1)], torch.tensor([3, 19]))
        assert hits.tolist() == [True, False]
    finally:
        destroy_parallel(layout)


@pytest.mark.parametrize("weight_trains", [True, False], ids=["trained-weight", "frozen-weight"])
@pytest.mark.parametrize("chunk", [1024, 7])
def test_loss_head_over_a_vocab_split_in_two(chunk, weight_trains):
    from _multiproc import run_world

    run_world(_vocab_parallel_loss, 2, chunk, weight_trains)
