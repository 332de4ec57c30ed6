"""lm-evaluation-harness over our engine (``evaluation.lm_eval_model``): on the same weights, tasks score as with
lm_eval's own ``hf`` model, and loglikelihoods equal transformers' log-softmax sums.

The tiny random Llama's scores are meaningless as accuracies; what is compared is every request's result.
"""

import dataclasses
from pathlib import Path

import pytest
import torch
import yaml

pytest.importorskip("lm_eval")

from lm_eval import simple_evaluate  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.api.registry import get_model  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from nemo_customizer.evaluation.lm_eval_model import CustomizerLM, _device_from_cli  # noqa: E402

from _tiny import TINY_VOCAB, tiny_arch, write_tiny_model_dir  # noqa: E402

DATA = Path(__file__).parent / "data" / "lm_eval"
TASKS = ["tiny_choice", "tiny_perplexity", "tiny_generate"]
MAX_LENGTH = 64  # short: long contexts are cut from the left, and a text takes several rolling windows
# a template that starts with the BOS text, so chat-templated contexts must not get a second BOS
CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}assistant:{% endif %}")
LOGPROB_ATOL = 1e-4  # per request, nats: fp32 forward passes of two implementations
RELATIVE = 1e-5  # perplexities and rolling loglikelihoods


@pytest.fixture(scope="module", autouse=True)
def offline():
    """Datasets and models come from local files only."""
    import datasets
    import huggingface_hub

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_DATASETS_OFFLINE", "1")
        patch.setenv("HF_HUB_OFFLINE", "1")
        patch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)  # both read the variables when imported
        patch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
        yield


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(checkpoint dir, HF LlamaForCausalLM with its weights): random tiny Llama, byte tokenizer, a chat template."""
    from transformers import AutoTokenizer

    directory = tmp_path_factory.mktemp("tiny")
    # 4096 positions: the hf-llama config's max_seq_length must fit
    arch = dataclasses.replace(tiny_arch(vocab=TINY_VOCAB), max_position_embeddings=4096, head_dim=16,
                               bos_token_id=1, eos_token_id=2)
    hf = write_tiny_model_dir(directory, arch)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(directory)
    return directory, hf


@pytest.fixture(scope="module")
def lm(tiny):
    """Ours, built as ``lm_eval --model nemo_customizer --model_args ...`` builds it (the CLI's defaults given)."""
    directory, _ = tiny
    model = get_model("nemo_customizer").create_from_arg_string(
        f"config=hf-llama,checkpoint={directory},device=cpu,max_length={MAX_LENGTH},batch_size=4",
        {"batch_size": 1, "max_batch_size": None, "device": "cuda:0"})
    yield model
    model.generator.close()


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    """tests/data/lm_eval's task YAMLs with absolute data paths and a private datasets cache."""
    directory = tmp_path_factory.mktemp("tasks")
    for source in DATA.glob("*.yaml"):
        config = yaml.safe_load(source.read_text())
        kwargs = config["dataset_kwargs"]
        kwargs["data_files"] = {split: str(DATA / name) for split, name in kwargs["data_files"].items()}
        kwargs["cache_dir"] = str(directory / "datasets_cache")
        (directory / source.name).write_text(yaml.safe_dump(config))
    return directory


def _hf_lm(directory, **options):
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=str(directory), dtype="float32", device="cpu", max_length=MAX_LENGTH, batch_size=1,
                **options)


def _requests(kind, arguments):
    return [Instance(request_type=kind, doc={}, arguments=args, idx=0) for args in arguments]


@pytest.mark.parametrize("chat", [False, True], ids=["plain", "chat_template"])
def test_tasks_score_as_lm_evals_hf_model(lm, tiny, task_dir, chat):
    directory, _ = tiny
    options = dict(tasks=TASKS, log_samples=True, bootstrap_iters=0, apply_chat_template=chat)
    ours = simple_evaluate(model=lm, task_manager=TaskManager(include_path=str(task_dir), include_defaults=False),
                           **options)
    theirs = simple_evaluate(model="hf", model_args=f"pretrained={directory},dtype=float32,device=cpu,"
                                                    f"max_length={MAX_LENGTH}",
                             task_manager=TaskManager(include_path=str(task_dir), include_defaults=False), **options)
    for task in TASKS:
        assert [s["arguments"] for s in ours["samples"][task]] == [s["arguments"] for s in theirs["samples"][task]]
    results, expected = ours["results"], theirs["results"]
    assert results["tiny_choice"]["acc,none"] == expected["tiny_choice"]["acc,none"]
    assert results["tiny_choice"]["acc_norm,none"] == expected["tiny_choice"]["acc_norm,none"]
    assert results["tiny_generate"]["exact_match,none"] == expected["tiny_generate"]["exact_match,none"]
    for metric in ("word_perplexity,none", "byte_perplexity,none", "bits_per_byte,none"):
        assert results["tiny_perplexity"][metric] == pytest.approx(expected["tiny_perplexity"][metric], rel=RELATIVE)

    for mine, hf in zip(ours["samples"]["tiny_choice"], theirs["samples"]["tiny_choice"], strict=True):
        for (logprob, greedy), (hf_logprob, hf_greedy) in zip(_flat(mine), _flat(hf), strict=True):
            assert logprob == pytest.approx(hf_logprob, abs=LOGPROB_ATOL) and greedy == hf_greedy
    for mine, hf in zip(ours["samples"]["tiny_perplexity"], theirs["samples"]["tiny_perplexity"], strict=True):
        assert _flat(mine) == pytest.approx(_flat(hf), rel=RELATIVE)
    assert [s["resps"] for s in ours["samples"]["tiny_generate"]] == \
        [s["resps"] for s in theirs["samples"]["tiny_generate"]]


def _flat(sample):
    return [response for responses in sample["resps"] for response in responses]


def test_loglikelihood_equals_transformers_logsoftmax_sums(lm, tiny):
    _, hf = tiny
    ours = CustomizerLM(lm.generator, batch_size=2)  # the whole context: nothing is truncated

    def tokens(text):
        return lm.tokenizer.encode(text, add_special_tokens=False)  # the byte tokenizer adds no BOS itself

    def greedy_case():
        """A prompt whose greedy next token is text (most of the random model's are stray bytes)."""
        for text in ("The cat sat on", "Once upon a time", "Hello there", "1, 2, 3,", "abc", "Yes", "No"):
            prompt = tokens(text)
            with torch.no_grad():
                best = int(hf(torch.tensor([prompt])).logits[0, -1].argmax())
            word = lm.tokenizer.decode([best])
            if tokens(text + word) == prompt + [best]:
                return (text, word), (prompt, [best])
        raise AssertionError("no prompt has a greedy next token that is text")

    # (context, continuation) -> the token ids scored by hand: (context ids, continuation ids)
    cases = [(("The river rose", " after the rain"), (tokens("The river rose"), tokens(" after the rain"))),
             (("Hello ", "world"), (tokens("Hello"), tokens(" world"))),  # the trailing space moves
             (("", "Rain"), ([1], tokens("Rain"))),  # an empty context is the BOS token
             (("  ", "Sun"), ([1], tokens("  Sun"))),  # so is one of whitespace only (lm_eval's hf model fails)
             greedy_case()]
    results = ours.loglikelihood(_requests("loglikelihood", [request for request, _ in cases]))
    for (_, (context, continuation)), (logprob, is_greedy) in zip(cases, results, strict=True):
        with torch.no_grad():
            logprobs = torch.log_softmax(hf(torch.tensor([context + continuation])).logits[0].float(), dim=-1)
        rows = logprobs[len(context) - 1:-1]  # the predictions of the continuation's tokens
        expected = float(rows.gather(1, torch.tensor(continuation)[:, None]).sum())
        assert logprob == pytest.approx(expected, abs=LOGPROB_ATOL)
        assert is_greedy == bool((rows.argmax(dim=-1) == torch.tensor(continuation)).all())
    assert results[-1][1] and not results[0][1]


@pytest.mark.parametrize("add_bos_token", [None, True, False])
def test_requests_match_hf_model(lm, tiny, add_bos_token):
    """Request by request, including BOS handling, truncation, rolling windows and stop strings."""
    directory, _ = tiny
    hf = _hf_lm(directory, add_bos_token=add_bos_token)
    ours = CustomizerLM(lm.generator, batch_size=3, max_length=MAX_LENGTH, add_bos_token=add_bos_token)
    long_text = ("Libraries lend books for free, and many of them also lend tools, seeds and musical instruments "
                 "to anyone who asks. ")
    pairs = [("The river rose", " after rain"), ("Hello ", "world"), ("", "Good bread"), ("<s>Prefixed", " text"),
             (long_text, " The end."), ("Question: what is it?\n", "Answer: a cat")]
    got = ours.loglikelihood(_requests("loglikelihood", pairs))
    want = hf.loglikelihood(_requests("loglikelihood", pairs))
    for (logprob, greedy), (hf_logprob, hf_greedy) in zip(got, want, strict=True):
        assert logprob == pytest.approx(hf_logprob, abs=LOGPROB_ATOL) and greedy == hf_greedy

    texts = [(long_text * 2,), ("Good bread needs only flour, water, salt and time.",), ("",)]
    got = ours.loglikelihood_rolling(_requests("loglikelihood_rolling", texts))
    want = hf.loglikelihood_rolling(_requests("loglikelihood_rolling", texts))
    assert got == pytest.approx(want, rel=RELATIVE)

    # stop strings taken from what the model generates, so that they do occur
    contexts = ["Q: What do bees make?\nA:", long_text, "<s>Once upon a time"]
    free = hf.generate_until(_requests("generate_until", [(c, {"until": [], "max_gen_toks": 12}) for c in contexts]))
    requests = [(c, {"until": [text[4:6]] if len(text) >= 6 else ["zz"], "max_gen_toks": 12})
                for c, text in zip(contexts, free)]
    requests += [(c, {"until": ["never appears"], "max_gen_toks": 5, "do_sample": False}) for c in contexts]
    got = ours.generate_until(_requests("generate_until", requests))
    assert got == hf.generate_until(_requests("generate_until", requests))
    assert any(len(text) < len(full) for text, full in zip(got, free))  # a stop string cut a completion


def test_chat_template_renders_as_hf_model(lm, tiny):
    directory, _ = tiny
    hf = _hf_lm(directory)
    conversation = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                    {"role": "assistant", "content": "Hello"}]
    for prompt in (True, False):
        assert lm.apply_chat_template(conversation, prompt) == hf.apply_chat_template(conversation, prompt)
    assert lm.chat_template(True) == CHAT_TEMPLATE and lm.chat_template(False) is None
    assert lm.tokenizer_name == hf.tokenizer_name


def test_sampling_replays_under_torch_seed(lm):
    requests = _requests("generate_until", [("Once", {"do_sample": True, "temperature": 0.8, "top_p": 0.9,
                                                      "until": [], "max_gen_toks": 6})] * 3)
    torch.manual_seed(0)
    first = lm.generate_until(requests)
    torch.manual_seed(0)
    assert lm.generate_until(requests) == first
    assert len(set(first)) > 1  # repeated requests draw their own samples


@pytest.mark.parametrize("call, message", [
    (lambda lm: CustomizerLM.create_from_arg_obj({"pretrained": "gpt2"}), "unknown nemo_customizer model_args"),
    (lambda lm: CustomizerLM(lm.generator, max_length=10**6), "max_length must be in"),
    (lambda lm: CustomizerLM(lm.generator, batch_size=0), "batch_size must be at least 1"),
    (lambda lm: lm.generate_until(_requests("generate_until", [("x", {"until": [], "num_beams": 4})])),
     r"\['num_beams'\] are not supported"),
    (lambda lm: lm.generate_until(_requests("generate_until", [("x", {"max_gen_toks": MAX_LENGTH})])),
     "leaves no room"),
    (lambda lm: lm.loglikelihood(_requests("loglikelihood", [("x", "")])), "the continuation is 0 tokens"),
    (lambda lm: _device_from_cli("cuda:1"), "runs on cpu or cuda"),
])
def test_mistakes_are_refused(lm, call, message):
    with pytest.raises(ValueError, match=message):
        call(lm)


def test_cli_device_defaults():
    assert _device_from_cli("cpu") == "cpu"
    assert _device_from_cli("cuda:0") == "auto"  # lm_eval's default --device: CUDA where there is one
