"""Token log-probabilities (``inference.scoring``) equal transformers' on the same weights, batched or alone."""

import dataclasses

import pytest
import torch

from nemo_customizer.inference import Generator
from nemo_customizer.inference.scoring import score_targets

from _tiny import TINY_VOCAB, tiny_arch, tiny_generator_config, write_tiny_model_dir


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny")
    arch = dataclasses.replace(tiny_arch(vocab=TINY_VOCAB), max_position_embeddings=2048, head_dim=16,
                               bos_token_id=1, eos_token_id=2)
    hf = write_tiny_model_dir(directory, arch)
    with Generator.from_config(tiny_generator_config(directory, arch)) as generator:
        yield generator, hf


def _hf_scores(hf, ids, mask):
    with torch.no_grad():
        logprobs = torch.log_softmax(hf(torch.tensor([ids])).logits[0].float(), dim=-1)  # [n, vocab]
    wanted = [(i, ids[i]) for i in range(1, len(ids)) if mask[i]]
    return ([float(logprobs[i - 1, t]) for i, t in wanted],
            [bool(logprobs[i - 1].argmax() == t) for i, t in wanted])


def test_scores_match_transformers_batched_and_alone(tiny):
    generator, hf = tiny
    rng = torch.Generator().manual_seed(0)
    sequences = [torch.randint(3, TINY_VOCAB, (n,), generator=rng).tolist() for n in (5, 17, 2, 30, 9)]
    masks = [[0] + [int(i % 3 != 0) for i in range(1, len(s))] for s in sequences]
    batched = score_targets(generator.model, sequences, masks, device=generator.device, batch_tokens=64)
    alone = score_targets(generator.model, sequences, masks, device=generator.device, batch_tokens=1)
    for ids, mask, got, single in zip(sequences, masks, batched, alone):
        want_logprobs, want_greedy = _hf_scores(hf, ids, mask)
        assert len(got.logprobs) == sum(mask)
        torch.testing.assert_close(torch.tensor(got.logprobs), torch.tensor(want_logprobs), atol=1e-4, rtol=1e-4)
        assert got.greedy == want_greedy
        torch.testing.assert_close(torch.tensor(got.logprobs), torch.tensor(single.logprobs), atol=1e-5, rtol=1e-5)


def test_greedy_continuation_is_flagged(tiny):
    generator, hf = tiny
    prompt = [5, 9, 40, 7]
    with torch.no_grad():
        best = int(hf(torch.tensor([prompt])).logits[0, -1].argmax())
    worst = int(hf(torch.tensor([prompt])).logits[0, -1].argmin())
    good, bad = score_targets(generator.model, [prompt + [best], prompt + [worst]], [[0, 0, 0, 0, 1]] * 2,
                              device=generator.device)
    assert good.all_greedy and not bad.all_greedy
    assert good.total > bad.total


def test_bad_masks_are_refused(tiny):
    generator, _ = tiny
    with pytest.raises(ValueError, match="first token"):
        score_targets(generator.model, [[1, 2, 3]], [[1, 0, 1]], device=generator.device)
    with pytest.raises(ValueError, match="target mask has 2"):
        score_targets(generator.model, [[1, 2, 3]], [[0, 1]], device=generator.device)
