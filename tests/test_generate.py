"""Generation: KV-cached greedy decoding matches the no-cache loop, transformers and peft; stops, sampling, limits."""

import dataclasses

import pytest
import torch

from nemo_customizer.inference import Completion, Generator, generate
from nemo_customizer.inference.sampling import find_stop, next_token
from nemo_customizer.models.gpt import forward_logits

from _tiny import TINY_VOCAB, tiny_arch, tiny_generator_config, write_random_peft_adapter, write_tiny_model_dir

PROMPTS = ["hello world", "The quick brown fox jumps over", "x"]


def _arch(max_positions: int = 2048):
    return dataclasses.replace(tiny_arch(vocab=TINY_VOCAB), max_position_embeddings=max_positions, head_dim=16,
                               bos_token_id=1, eos_token_id=2)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(checkpoint dir, architecture, HF LlamaForCausalLM with the same weights)."""
    directory = tmp_path_factory.mktemp("tiny")
    arch = _arch()
    return directory, arch, write_tiny_model_dir(directory, arch)



@pytest.fixture
def generator(tiny):
    directory, arch, _ = tiny
    with Generator.from_config(tiny_generator_config(directory, arch)) as gen:
        yield gen


def _greedy_without_cache(gen: Generator, prompt: str, max_tokens: int) -> list[int]:
    """Reference: recompute the whole sequence for every new token."""
    sequence = gen.encode(prompt)
    out = []
    with torch.no_grad():
        for _ in range(max_tokens):
            token = int(forward_logits(gen.model, torch.tensor([sequence]))[0, -1].argmax())
            out.append(token)
            sequence.append(token)
            if token in gen.eos_ids:
                break
    return out


def _hf_greedy(hf_model, prompt_ids: list[int], max_tokens: int) -> list[int]:
    output = hf_model.generate(torch.tensor([prompt_ids]), do_sample=False, max_new_tokens=max_tokens,
                               eos_token_id=2, pad_token_id=0)
    return output[0, len(prompt_ids):].tolist()


def test_kv_cache_greedy_matches_no_cache_loop_and_transformers(generator, tiny):
    hf = tiny[2]
    for prompt in PROMPTS:
        completion = generator.complete(prompt, max_tokens=24)
        assert completion.token_ids == _greedy_without_cache(generator, prompt, 24)
        assert completion.token_ids == _hf_greedy(hf, generator.encode(prompt), 24)
        assert completion.prompt_tokens == len(generator.encode(prompt))
        assert completion.completion_tokens == len(completion.token_ids)


def test_adapter_greedy_matches_peft(tiny, tmp_path):
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    directory, arch, _ = tiny
    write_random_peft_adapter(directory, tmp_path / "adapter", ["q_proj", "v_proj", "down_proj"])
    reference = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(str(directory)),
                                          str(tmp_path / "adapter")).eval()
    with Generator.from_config(tiny_generator_config(directory, arch), adapter=str(tmp_path / "adapter")) as gen:
        adapted = [gen.complete(prompt, max_tokens=16).token_ids for prompt in PROMPTS[:2]]
        assert adapted == [_hf_greedy(reference, gen.encode(prompt), 16) for prompt in PROMPTS[:2]]
    with Generator.from_config(tiny_generator_config(directory, arch)) as plain:
        assert plain.complete(PROMPTS[0], max_tokens=16).token_ids != adapted[0]


def test_stop_string_cuts_text_before_it(generator):
    full = generator.complete(PROMPTS[0], max_tokens=24)
    assert full.finish_reason == "length" and len(full.text) > 6
    # a stop string of settled characters (the byte tokenizer's random output has U+FFFD for invalid bytes)
    stop = next(pair for pair in (full.text[i:i + 2] for i in range(1, len(full.text) - 1))
                if "\ufffd" not in pair and full.text.index(pair) > 0)
    cut = generator.complete(PROMPTS[0], max_tokens=24, stop=["never there", stop])
    assert cut.finish_reason == "stop"
    assert cut.text == full.text[:full.text.index(stop)]
    assert cut.token_ids == full.token_ids[:len(cut.token_ids)] and len(cut.token_ids) < 24


def test_max_tokens_and_eos_finish_reasons(generator):
    short = generator.complete(PROMPTS[0], max_tokens=5)
    assert (short.finish_reason, short.completion_tokens) == ("length", 5)
    # make the first greedy token an eos id: generation stops on it and the text leaves it out
    first = short.token_ids[0]
    ends_at_first = Generator(generator.model, generator.tokenizer, eos_ids=[first],
                              max_context=generator.max_context, device=generator.device)
    stopped = ends_at_first.complete(PROMPTS[0], max_tokens=5)
    assert stopped == Completion(text="", token_ids=[first], finish_reason="stop",
                                 prompt_tokens=short.prompt_tokens, completion_tokens=1)


def test_seeded_sampling_is_reproducible_and_not_greedy(generator):
    greedy = generator.complete(PROMPTS[1], max_tokens=16).token_ids
    first = generator.complete(PROMPTS[1], max_tokens=16, temperature=1.0, top_p=0.9, seed=7).token_ids
    again = generator.complete(PROMPTS[1], max_tokens=16, temperature=1.0, top_p=0.9, seed=7).token_ids
    other = generator.complete(PROMPTS[1], max_tokens=16, temperature=1.0, top_p=0.9, seed=8).token_ids
    assert first == again
    assert first != greedy and first != other


def test_next_token_top_p_keeps_the_nucleus():
    logits = torch.tensor([0.0, 3.0, 2.9, -5.0])
    rng = torch.Generator().manual_seed(0)
    assert next_token(logits, temperature=0.0, top_p=1.0, generator=None) == 1
    assert {next_token(logits, temperature=1.0, top_p=0.01, generator=rng) for _ in range(50)} == {1}
    assert {next_token(logits, temperature=1.0, top_p=0.9, generator=rng) for _ in range(200)} == {1, 2}
    assert find_stop("abc\nClass: x", ["\n", "Class"]) == 3 and find_stop("abc", ["z", ""]) is None


def test_prompt_longer_than_context_is_an_error(tmp_path):
    arch = _arch(max_positions=16)
    write_tiny_model_dir(tmp_path, arch)
    with Generator.from_config(tiny_generator_config(tmp_path, arch)) as gen:
        with pytest.raises(ValueError, match="prompt is 16 tokens, but the model's context is 16 tokens"):
            gen.complete("a" * 16)
        last = gen.complete("a" * 15, max_tokens=8)  # room for exactly one new token
        assert last.completion_tokens == 1


def test_complete_batch_and_generate_match_complete(generator, tiny):
    singles = [generator.complete(p, max_tokens=12, stop=["\x00"]) for p in PROMPTS]
    assert generator.complete_batch(PROMPTS, max_tokens=12, stop=["\x00"]) == singles
    assert generator.complete_batch(PROMPTS, max_tokens=12, stop=["\x00"], batch_size=2) == singles
    sampled = generator.complete(PROMPTS[0], max_tokens=12, temperature=0.8, seed=5)
    assert generator.complete_batch(PROMPTS[:1], max_tokens=12, temperature=0.8, seed=5) == [sampled]
    generator.close()  # generate() below starts and tears down its own parallel state
    directory, arch, _ = tiny
    assert generate(PROMPTS[0], config=tiny_generator_config(directory, arch), max_tokens=12) == singles[0].text
