"""The DPO loss through the real schedule (mcore forward/backward, DDP) on a tiny model equals a direct
implementation of the formula from plain logits, with its gradients; the reference is the base model's
log-probabilities (LoRA: adapters switched off; checked against transformers); packed pairs equal padded ones."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

from _tiny import tiny_arch, write_tiny_checkpoint

TARGETS = ["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"]
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    directory = tmp_path_factory.mktemp("dpo_loss")
    write_tiny_checkpoint(directory, tiny_arch(heads=4, kv_heads=2))
    return directory


def random_pairs(vocab: int, n: int = 6, seed: int = 0):
    """Pairs sharing a prompt per pair, responses of different lengths (padding in every micro batch)."""
    from nemo_customizer.data import TokenizedExample, TokenizedPair

    rng = random.Random(seed)
    pairs = []
    for _ in range(n):
        prompt = [rng.randrange(vocab) for _ in range(rng.randint(2, 10))]

        def response():
            answer = [rng.randrange(vocab) for _ in range(rng.randint(1, 9))]
            return TokenizedExample(prompt + answer, [0] * len(prompt) + [1] * len(answer))

        pairs.append(TokenizedPair(response(), response()))
    return pairs


def dpo_config(finetuning: str = "lora", **dpo):
    from nemo_customizer.config import Config, DpoConfig, HyperparametersConfig, LoraConfig, ModelConfig

    return Config(
        model=ModelConfig(architecture=tiny_arch(heads=4, kv_heads=2), max_seq_length=32),
        hyperparameters=HyperparametersConfig(
            seed=0, training_type="dpo", finetuning_type=finetuning, dpo=DpoConfig(**dpo),
            lora=LoraConfig(adapter_dim=4, adapter_dropout=0.0, target_modules=TARGETS)),
        device="cpu", precision="fp32")


def randomize_trainable(model, seed: int = 1) -> None:
    """LoRA B starts at zero (policy == reference); random adapters (or weights) make the policy differ."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.requires_grad:
                param.add_(torch.randn(param.shape, generator=gen) * (0.1 if "lora" in name else 0.02))


def direct_log_probs(model, pairs) -> torch.Tensor:
    """``(pairs, 2, 2)``: per sequence (summed log-prob of its response tokens, their number), from the full logits
    of one sequence at a time: ``log_softmax``, gather, sum."""
    from nemo_customizer.models.gpt import forward_logits

    rows = []
    for pair in pairs:
        for sequence in (pair.chosen, pair.rejected):
            ids = torch.tensor(sequence.input_ids)
            logits = forward_logits(model, ids[None, :-1])[0].float()
            token_log_probs = logits.log_softmax(-1).gather(1, ids[1:, None])[:, 0]
            mask = torch.tensor(sequence.loss_mask[1:], dtype=torch.bool)
            rows.append(torch.stack([token_log_probs[mask].double().sum(), mask.sum().double()]))
    return torch.stack(rows).view(len(pairs), 2, 2)


def direct_dpo(policy, reference, dpo) -> dict:
    """The formula, written out per pair: mean loss, rewards and accuracy over the pairs."""
    losses, chosen_rewards, rejected_rewards = [], [], []
    for (pc, nc), (pr, nr), (rc, _), (rr, _) in zip(policy[:, 0], policy[:, 1], reference[:, 0], reference[:, 1]):
        if dpo.preference_average_log_probs:
            pc_, pr_, rc_, rr_ = pc / nc, pr / nr, rc / nc, rr / nr
        else:
            pc_, pr_, rc_, rr_ = pc, pr, rc, rr
        chosen_reward = dpo.ref_policy_kl_penalty * (pc_ - rc_)
        rejected_reward = dpo.ref_policy_kl_penalty * (pr_ - rr_)
        loss = -dpo.preference_loss_weight * F.logsigmoid(chosen_reward - rejected_reward)
        loss = loss - dpo.sft_loss_weight * (pc / nc if dpo.sft_average_log_probs else pc)
        losses.append(loss)
        chosen_rewards.append(chosen_reward)
        rejected_rewards.append(rejected_reward)
    chosen, rejected = torch.stack(chosen_rewards), torch.stack(rejected_rewards)
    return {"loss": torch.stack(losses).mean(), "rewards_chosen": chosen.mean().item(),
            "rewards_rejected": rejected.mean().item(), "reward_accuracy": (chosen > rejected).double().mean().item()}


VARIANTS = {
    "sum": {},
    "average": {"preference_average_log_probs": True},
    "sum+sft": {"sft_loss_weight": 0.5},
    "average+sft-average": {"preference_average_log_probs": True, "sft_loss_weight": 0.5,
                            "sft_average_log_probs": True},
    "sft-only-beta": {"ref_policy_kl_penalty": 0.3, "preference_loss_weight": 0.7, "sft_loss_weight": 0.2},
}


@pytest.mark.parametrize("finetuning, variant", [("lora", name) for name in VARIANTS] + [("all_weights", "sum+sft")])
def test_loss_rewards_and_gradients_equal_the_formula(cpu_parallel, checkpoint, finetuning, variant):
    from nemo_customizer.training.preference import PreferenceLoss, ScoredPair, reference_log_probs
    from nemo_customizer.training.session import TrainingSession
    from nemo_customizer.training.step import forward_backward

    cfg = dpo_config(finetuning, **VARIANTS[variant])
    dpo = cfg.hyperparameters.dpo
    pairs = random_pairs(cfg.model.architecture.vocab_size)
    with TrainingSession(cfg, checkpoint_dir=checkpoint, layout=cpu_parallel) as base_session:
        reference = direct_log_probs(base_session.build_model(trainable=False).eval(), pairs)
    with TrainingSession(cfg, checkpoint_dir=checkpoint, layout=cpu_parallel) as session, \
            TrainingSession(cfg, checkpoint_dir=checkpoint, layout=cpu_parallel) as plain:
        model = session.build_model()
        ddp = session.build_training(total_steps=1)
        # all_weights: the reference is the model before any update
        table = reference_log_probs(ddp, pairs, batch_size=6, micro_batch_size=3, layout=cpu_parallel, pad_id=0,
                                    pad_to_multiple_of=1)
        torch.testing.assert_close(table, reference[:, :, 0], rtol=1e-5, atol=1e-5)
        randomize_trainable(model)
        objective = PreferenceLoss(dpo)
        scored = [ScoredPair(p, tuple(row)) for p, row in zip(pairs, table.tolist())]
        micro_batches = [objective.collate(scored[:2], pad_id=0, pad_to_multiple_of=1),
                         objective.collate(scored[2:], pad_id=0, pad_to_multiple_of=1)]
        ddp.zero_grad_buffer()
        loss_sum, count, chosen, rejected, correct = forward_backward(
            ddp, micro_batches, CPU, forward_only=False, objective=objective).tolist()

        # the same model without DDP (plain autograd), the same weights
        twin = plain.build_model()
        randomize_trainable(twin)
        expected = direct_dpo(direct_log_probs(twin, pairs), reference, dpo)
        expected["loss"].backward()
        assert count == len(pairs)
        assert loss_sum / count == pytest.approx(expected["loss"].item(), rel=1e-5)
        assert objective.metrics([chosen, rejected, correct], count) == pytest.approx(
            {**{k: v for k, v in expected.items() if k != "loss"},
             "reward_margin": expected["rewards_chosen"] - expected["rewards_rejected"]}, rel=1e-5, abs=1e-7)
        assert 0 < correct < count  # the check can tell right from wrong orderings
        grads = {name: param.grad for name, param in twin.named_parameters() if param.requires_grad}
        assert grads and all(grad is not None for grad in grads.values())
        for name, param in model.named_parameters():
            if param.requires_grad:  # the schedule leaves the gradient of the sum: the step divides by the count
                torch.testing.assert_close(param.main_grad / count, grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_lora_reference_is_the_base_models_with_the_adapters_switched_back_on_after(cpu_parallel, checkpoint):
    """Reference log-probs of a LoRA model with trained (random) adapters equal transformers' base model's; the
    adapters are on again afterwards."""
    from transformers import AutoModelForCausalLM

    from nemo_customizer.models.gpt import forward_logits
    from nemo_customizer.training.preference import reference_log_probs
    from nemo_customizer.training.session import TrainingSession

    cfg = dpo_config()
    pairs = random_pairs(cfg.model.architecture.vocab_size, n=5, seed=3)
    hf = AutoModelForCausalLM.from_pretrained(str(checkpoint)).eval()
    expected = []
    with torch.no_grad():
        for pair in pairs:
            for sequence in (pair.chosen, pair.rejected):
                ids = torch.tensor(sequence.input_ids)
                log_probs = hf(ids[None, :-1]).logits[0].float().log_softmax(-1).gather(1, ids[1:, None])[:, 0]
                expected.append(log_probs[torch.tensor(sequence.loss_mask[1:], dtype=torch.bool)].double().sum())
    with TrainingSession(cfg, checkpoint_dir=checkpoint, layout=cpu_parallel) as session:
        model = session.build_model()
        ddp = session.build_training(total_steps=1)
        randomize_trainable(model)
        tokens = torch.tensor([pairs[0].chosen.input_ids])
        with torch.no_grad():
            before = forward_logits(model.eval(), tokens)
        # 5 pairs in steps of 4: the last step is padded with padding pairs
        table = reference_log_probs(ddp, pairs, batch_size=4, micro_batch_size=2, layout=cpu_parallel, pad_id=0,
                                    pad_to_multiple_of=1)
        with torch.no_grad():
            after = forward_logits(model.eval(), tokens)
            base = hf(tokens).logits
    torch.testing.assert_close(table.flatten(), torch.stack(expected), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(after, before)
    assert (after - base).abs().max() > 1e-3  # the adapters change the output: they are on


def test_packed_pairs_equal_padded_pairs(cpu_parallel, checkpoint):
    """The loss, rewards and LoRA gradients of pairs packed two bins to a row equal those of the same pairs
    padded: each sequence a segment of its own (attention and positions restart), both of a pair in one row."""
    from nemo_customizer.data import plan_pair_packing
    from nemo_customizer.training.preference import PreferenceLoss, ScoredPair
    from nemo_customizer.training.session import TrainingSession
    from nemo_customizer.training.step import forward_backward

    cfg = dpo_config(sft_loss_weight=0.3)
    pairs = random_pairs(cfg.model.architecture.vocab_size, n=8, seed=5)
    scored = [ScoredPair(p, (-30.0 - i, -28.0 + i)) for i, p in enumerate(pairs)]
    plan = plan_pair_packing(pairs, max_seq_length=32, batch_size=8, micro_batch_size=4, dp_size=1, seed=0)
    bins = plan.take(scored)
    assert len(bins) < len(pairs) and any(len(b) > 1 for b in bins)
    objective = PreferenceLoss(cfg.hyperparameters.dpo)
    in_bins = [item for b in bins for item in b]  # the padded batches hold the same pairs
    padded = [objective.collate(in_bins[:4], pad_id=0, pad_to_multiple_of=1),
              objective.collate(in_bins[4:], pad_id=0, pad_to_multiple_of=1)]
    half = len(bins) // 2
    packed = [objective.collate_packed(bins[:half], pad_id=0, pad_to_multiple_of=4),
              objective.collate_packed(bins[half:], pad_id=0, pad_to_multiple_of=4)]
    with TrainingSession(cfg, checkpoint_dir=checkpoint, layout=cpu_parallel) as session:
        model = session.build_model()
        ddp = session.build_training(total_steps=1, packed=True)
        randomize_trainable(model)
        out = {}
        for name, batches in (("padded", padded), ("packed", packed)):
            ddp.zero_grad_buffer()
            totals = forward_backward(ddp, batches, CPU, forward_only=False, objective=objective).tolist()
            out[name] = totals, {n: p.main_grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    (padded_totals, padded_grads), (packed_totals, packed_grads) = out["padded"], out["packed"]
    assert packed_totals[1] == padded_totals[1] == len(pairs)
    assert packed_totals == pytest.approx(padded_totals, rel=1e-5, abs=1e-6)
    for name, grad in padded_grads.items():
        assert grad.norm() > 0, name
        assert (packed_grads[name] - grad).norm() / grad.norm() < 1e-5, name


def test_loss_head_gradients_are_exact_for_any_upstream_gradient(cpu_parallel, monkeypatch):
    """A preference loss gives each token loss its own gradient: with ``per_position_grads`` the trained output
    weight's gradient (and the hidden states') equal autograd's through the full logits, chunk by chunk."""
    from nemo_customizer.models import loss as loss_module

    monkeypatch.setattr(loss_module, "LOSS_CHUNK_TOKENS", 4)  # 11 positions: three chunks, the last short
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(11, 8, generator=gen, requires_grad=True)
    weight = torch.randn(32, 8, generator=gen, requires_grad=True)
    targets = torch.randint(0, 32, (11,), generator=gen)
    upstream = torch.randn(11, generator=gen, dtype=torch.float64)

    losses = loss_module.masked_token_losses(hidden, targets, weight, per_position_grads=True)
    (losses.double() * upstream).sum().backward()
    ours = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    expected = F.cross_entropy(hidden @ weight.t(), targets, reduction="none")
    (expected.double() * upstream).sum().backward()
    torch.testing.assert_close(losses, expected.detach())
    torch.testing.assert_close(ours[0], hidden.grad)
    torch.testing.assert_close(ours[1], weight.grad)
