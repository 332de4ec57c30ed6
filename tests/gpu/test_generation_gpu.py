"""Generation on CUDA with an adapter trained on CUDA: greedy tokens equal ``transformers`` + ``peft`` on the same GPU
(fp32); batched decoding equals one prompt at a time; rows with and without the adapter decode in one batch as they
do alone (the server's multi-LoRA path); bf16 generation runs (the default precision on GPUs)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

pytestmark = pytest.mark.gpu

PROMPTS = ["yes a b c\nAnswer: ", "no d d a b\nAnswer: ", "yes\nAnswer: ", "no a b c d a b c d a b\nAnswer: "]
TOKENS = 20


@dataclass(frozen=True)
class AdapterGenerations:
    """Greedy token ids of ``PROMPTS`` with the adapter, fp32: ours and the transformers+peft reference."""

    batched: list
    """Ours, all prompts in one batch."""
    single: list
    """Ours, one prompt at a time."""
    reference: list
    """transformers + peft, one prompt at a time."""


def _config(model_dir, precision: str):
    from nemo_customizer.config import compose_config

    return compose_config(["model=tiny-llama-test", f"model.checkpoint={model_dir}", "model.random_weights=false",
                           "device=cuda", f"precision={precision}"])


@pytest.fixture(scope="module")
def adapter(tiny_jobs):
    tiny_jobs.losses("lora-cuda", "cuda", "bf16", "lora")
    return tiny_jobs.adapter("lora-cuda")


@pytest.fixture(scope="module")
def adapter_generations(tiny_jobs, adapter) -> AdapterGenerations:
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    from nemo_customizer.inference.generator import Generator

    model_dir = tiny_jobs.root / "model"
    reference = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(str(model_dir)),
                                          str(adapter)).cuda().eval()
    with Generator.from_config(_config(model_dir, "fp32"), adapter=str(adapter)) as gen:
        batched = [c.token_ids for c in gen.complete_batch(PROMPTS, max_tokens=TOKENS)]
        single = [gen.complete(p, max_tokens=TOKENS).token_ids for p in PROMPTS]
        expected = []
        with torch.no_grad():
            for p in PROMPTS:
                ids = torch.tensor([gen.encode(p)], device="cuda")
                out = reference.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=TOKENS,
                                         do_sample=False, eos_token_id=sorted(gen.eos_ids), pad_token_id=0)
                expected.append(out[0, ids.shape[1]:].tolist())
    return AdapterGenerations(batched=batched, single=single, reference=expected)


def test_greedy_tokens_match_transformers_peft(adapter_generations):
    differ = [i for i, (a, b) in enumerate(zip(adapter_generations.single, adapter_generations.reference)) if a != b]
    assert not differ, f"prompts {differ} differ from transformers+peft"


def test_batched_decoding_matches_one_prompt_at_a_time(adapter_generations):
    differ = [i for i, (a, b) in enumerate(zip(adapter_generations.batched, adapter_generations.single)) if a != b]
    assert not differ, f"prompts {differ} differ when decoded in one batch"


def test_base_and_adapter_rows_in_one_batch_match_each_alone(tiny_jobs, adapter, adapter_generations):
    """The server's multi-LoRA path: two rows without and two with the adapter in one continuous batch."""
    from nemo_customizer.inference.continuous import ContinuousBatch
    from nemo_customizer.inference.generator import Generator

    with Generator.from_config(_config(tiny_jobs.root / "model", "fp32")) as gen:
        plain = [c.token_ids for c in gen.complete_batch(PROMPTS[:2], max_tokens=TOKENS)]
        gen.attach_adapters(max_rank=16).add("tuned", adapter)
        rows = [gen.new_row(gen.encode(p), max_tokens=TOKENS, adapter=name)
                for p, name in zip(PROMPTS[:2] * 2, [None, None, "tuned", "tuned"])]
        batch = ContinuousBatch(gen, max_rows=4)
        for row in rows:
            batch.add(row)
        while batch.active:
            batch.step()
        mixed = [row.completion().token_ids for row in rows]
    alone = plain + adapter_generations.single[:2]
    differ = [i for i, (a, b) in enumerate(zip(mixed, alone)) if a != b]
    assert not differ, f"rows {differ} differ from the same prompts decoded alone"
    assert plain != adapter_generations.single[:2], "the adapter changes nothing: the check would not see a mix-up"


def test_bf16_generation_runs(tiny_jobs, adapter):
    """The KV cache and batched decoding in bf16."""
    from nemo_customizer.inference.generator import Generator

    with Generator.from_config(_config(tiny_jobs.root / "model", "bf16"), adapter=str(adapter)) as gen:
        completions = gen.complete_batch(PROMPTS, max_tokens=TOKENS)
    assert all(c.completion_tokens == len(c.token_ids) > 0 for c in completions)


def test_windowed_generation_past_the_window_matches_transformers(tmp_path):
    """A tiny Mistral with a window of 8 keys, fp32 on CUDA: prefill (SDPA with the window's mask) and decode steps
    (keys older than the window masked in the KV cache), alone and batched, give transformers' greedy tokens."""
    import dataclasses

    from _family_checks import check_generation_matches_transformers
    from _tiny import TINY_VOCAB, tiny_arch

    arch = dataclasses.replace(tiny_arch(vocab=TINY_VOCAB, architecture="MistralForCausalLM", sliding_window=8),
                               bos_token_id=1, eos_token_id=2)
    check_generation_matches_transformers(tmp_path, arch, ["Mistral says hello!", "Hi", "a window of eight"],
                                          device="cuda")
