"""At the first step of a LoRA DPO job (B = 0: the policy is the reference) every pair's rewards are 0 up to rounding,
with the pairs shuffled and packed as training sees them: each pair meets its own reference log-probabilities. (The
reference pass batches pairs otherwise than the shuffled steps, so the GEMMs round differently; the margins are
noise and ``reward_accuracy`` counts about half of them.)"""

from __future__ import annotations

import random

import torch

CPU = torch.device("cpu")


def test_first_step_rewards_are_zero_with_shuffled_packed_pairs(cpu_parallel, monkeypatch):
    from nemo_customizer.config import compose_config
    from nemo_customizer.data import TokenizedExample, TokenizedPair, epoch_order, plan_pair_packing
    from nemo_customizer.training import preference
    from nemo_customizer.training.preference import PreferenceLoss, ScoredPair, reference_log_probs
    from nemo_customizer.training.session import TrainingSession
    from nemo_customizer.training.step import forward_backward

    cfg = compose_config(["model=smollm2-135m-instruct", "model.random_weights=true", "model.max_seq_length=48",
                          "hyperparameters.training_type=dpo", "hyperparameters.lora.adapter_dropout=0.0",
                          "hyperparameters.batch_size=8", "hyperparameters.micro_batch_size=4",
                          "hyperparameters.dpo.ref_policy_kl_penalty=1.0", "precision=fp32", "device=cpu"])
    rng = random.Random(0)
    vocab = cfg.model.architecture.vocab_size

    def sequence(prompt):
        response = [rng.randrange(vocab) for _ in range(rng.randint(4, 20))]
        return TokenizedExample(prompt + response, [0] * len(prompt) + [1] * len(response))

    pairs = []
    for _ in range(8):
        prompt = [rng.randrange(vocab) for _ in range(rng.randint(4, 20))]
        pairs.append(TokenizedPair(sequence(prompt), sequence(prompt)))
    rewards = []
    terms = preference.preference_terms

    def recorded(*args):
        out = terms(*args)
        rewards.append(torch.stack(out[1:], dim=1))
        return out

    monkeypatch.setattr(preference, "preference_terms", recorded)
    with TrainingSession(cfg, checkpoint_dir=None, layout=cpu_parallel) as session:
        session.build_model()
        ddp = session.build_training(total_steps=1, packed=True)
        table = reference_log_probs(ddp, pairs, batch_size=8, micro_batch_size=4, layout=cpu_parallel, pad_id=0,
                                    pad_to_multiple_of=1)
        scored = [ScoredPair(p, tuple(row)) for p, row in zip(pairs, table.tolist())]
        plan = plan_pair_packing(pairs, max_seq_length=48, batch_size=8, micro_batch_size=4, dp_size=1, seed=0)
        bins = plan.take(scored)
        bins = [bins[i] for i in epoch_order(len(bins), 0, 0)]  # the first epoch's shuffled order
        objective = PreferenceLoss(cfg.hyperparameters.dpo)
        half = len(bins) // 2
        batches = [objective.collate_packed(bins[:half], pad_id=0, pad_to_multiple_of=1),
                   objective.collate_packed(bins[half:], pad_id=0, pad_to_multiple_of=1)]
        ddp.zero_grad_buffer()
        _, count, _, _, _ = forward_backward(ddp, batches, CPU, forward_only=False,
                                                   objective=objective).tolist()
    assert count == 8
    assert torch.cat(rewards).abs().max() < 1e-5  # a pair scored against another's reference is off by ~1
