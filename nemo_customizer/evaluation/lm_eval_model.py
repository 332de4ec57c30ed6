"""lm-evaluation-harness over our inference engine: the ``nemo_customizer`` model of ``lm_eval``.

:class:`CustomizerLM` answers lm_eval's three request types with a :class:`~nemo_customizer.inference.Generator`
(the Megatron model, optionally with a LoRA adapter): ``loglikelihood`` and ``loglikelihood_rolling`` through
:func:`~nemo_customizer.inference.scoring.score_targets`, ``generate_until`` through the KV-cached engine. Text is
tokenized the way lm_eval's own ``hf`` model tokenizes it for the same tokenizer (context/continuation split,
BOS decision, prefix token, rolling windows, left truncation), so the same weights give the same scores.

lm_eval's ``lm_eval`` command only knows the models it ships, so run its command line through this module, which
registers ``nemo_customizer`` first (the arguments are lm_eval's)::

    python -m nemo_customizer.evaluation.lm_eval_model --model nemo_customizer \\
        --model_args config=smollm2-135m-instruct,adapter=outputs/job/adapter,device=cpu --tasks hellaswag

or, from Python, ``lm_eval.simple_evaluate(model=CustomizerLM(generator), tasks=[...])``.
"""

from __future__ import annotations

import logging
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch

try:
    # lm_eval fills its model registry with the built-in models only while the registry is empty: register those
    # first, or registering ours would hide them ("hf" would no longer be found).
    import lm_eval.models  # noqa: F401
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model
    from lm_eval.models.utils import normalize_gen_kwargs
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window, simple_parse_args_string
except ImportError as exc:  # the module is only imported where lm_eval is wanted
    raise ImportError(
        "nemo_customizer.evaluation.lm_eval_model needs lm-evaluation-harness: "
        "pip install 'nemo_customizer[lm_eval]'") from exc

from nemo_customizer.inference.generator import Completion, Generator
from nemo_customizer.inference.scoring import score_targets

logger = logging.getLogger(__name__)

MODEL_ARGS = ("config", "checkpoint", "adapter", "device", "batch_size", "max_length", "add_bos_token")
"""The keys ``--model_args`` accepts."""

_GEN_KWARGS = frozenset({"until", "max_gen_toks", "do_sample", "temperature", "top_p"})
_SAMPLING_ONLY = frozenset({"top_p", "top_k", "min_p", "typical_p"})  # without effect when decoding greedily


@register_model("nemo_customizer")
class CustomizerLM(LM):
    """An lm_eval model over ``generator`` (which stays the caller's to close).

    ``batch_size``: generations decoded together, and rows per scoring forward at ``max_length`` tokens (shorter
    rows share a forward up to ``batch_size × max_length`` tokens). ``max_length``: the context in tokens that
    requests are fitted into (default: the model's ``max_position_embeddings``, as lm_eval's ``hf`` model).
    ``add_bos_token``: None keeps the tokenizer's own choice; True / False force a BOS token on or off, as the
    ``hf`` model's argument of that name does.
    """

    max_gen_toks = 256  # generation length when a task does not set max_gen_toks (lm_eval's default)

    def __init__(self, generator: Generator, *, batch_size: int = 16, max_length: Optional[int] = None,
                 add_bos_token: Optional[bool] = None):
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        max_length = max_length or generator.max_context
        if not 1 < max_length <= generator.max_context:
            raise ValueError(f"max_length must be in 2..{generator.max_context} (the model's context), "
                             f"got {max_length}")
        if add_bos_token is not None and not isinstance(add_bos_token, bool):
            raise ValueError(f"add_bos_token must be true, false or unset, got {add_bos_token!r}")
        self.generator = generator
        self.batch_size = batch_size
        self.max_length = max_length
        self.add_bos_token = add_bos_token
        self._device = generator.device
        tokenizer = generator.tokenizer
        # conditions the first token of an empty context and of a rolling window: BOS, else EOS (as lm_eval's hf)
        self.prefix_token_id = tokenizer.bos_token_id if tokenizer.bos_token_id is not None \
            else tokenizer.eos_token_id
        self._prefix_text = tokenizer.decode([self.prefix_token_id])

    # ------------------------------------------------------------------ building from lm_eval's model_args

    @classmethod
    def from_model_args(cls, config: Optional[str] = None, checkpoint: Optional[str] = None,
                        adapter: Optional[str] = None, device: Optional[str] = None, **options: Any) -> "CustomizerLM":
        """Load ``config`` (a model config name, default as ``customize``'s; ``checkpoint`` overrides its
        ``model.checkpoint``) and ``adapter`` (an HF PEFT LoRA directory) into a new Generator that this model owns
        (``generator.close()`` releases it); ``options`` go to the constructor."""
        from nemo_customizer.config import config_from_kwargs

        overrides: Dict[str, Any] = {}
        if config is not None:
            overrides["config"] = str(config)
        if device is not None:
            overrides["device"] = str(device)
        if checkpoint is not None:
            overrides["model"] = {"checkpoint": str(checkpoint)}
        generator = Generator.from_config(config_from_kwargs(**overrides),
                                          adapter=None if adapter is None else str(adapter))
        try:
            return cls(generator, **options)
        except BaseException:
            generator.close()
            raise

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: Optional[dict] = None) -> "CustomizerLM":
        """``--model_args config=NAME,checkpoint=DIR,adapter=DIR,device=cpu`` (also ``batch_size``, ``max_length``,
        ``add_bos_token``).

        ``additional_config`` is what lm_eval's command line adds (``--device``, ``--batch_size``, always passed,
        with its defaults): a key given in ``model_args`` wins.
        """
        return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

    @classmethod
    def create_from_arg_obj(cls, arg_dict: Mapping[str, Any],
                            additional_config: Optional[dict] = None) -> "CustomizerLM":
        """``create_from_arg_string`` for ``model_args`` given as a dict."""
        args = dict(arg_dict)
        unknown = sorted(set(args) - set(MODEL_ARGS))
        if unknown:
            raise ValueError(f"unknown nemo_customizer model_args {unknown}; accepted: {', '.join(MODEL_ARGS)}")
        extra = additional_config or {}
        if "device" not in args and extra.get("device"):
            args["device"] = _device_from_cli(str(extra["device"]))
        batch_size = extra.get("batch_size")
        if "batch_size" not in args and batch_size is not None and str(batch_size).isdigit():
            args["batch_size"] = int(batch_size)  # "auto" keeps our default: batches are bounded by tokens
        return cls.from_model_args(**args)

    # ------------------------------------------------------------------ tokenization, as lm_eval's hf model does

    @property
    def tokenizer(self):
        return self.generator.tokenizer

    @property
    def tokenizer_name(self) -> str:
        """Names the tokenizer in lm_eval's request-cache keys."""
        return self.tokenizer.name_or_path.replace("/", "__")

    def tok_encode(self, text: str, add_special_tokens: Optional[bool] = None) -> List[int]:
        """Token ids of ``text``. ``add_special_tokens=None`` means ``add_bos_token`` if set, else the tokenizer's
        default; a text that already starts with the prefix token (a rendered chat template) gets none."""
        if add_special_tokens is None:
            prefixed = bool(self._prefix_text) and text.startswith(self._prefix_text)
            add_special_tokens = False if prefixed else self.add_bos_token
        return self._encode(text, add_special_tokens)

    def _encode(self, text: str, add_special_tokens: Optional[bool]) -> List[int]:
        if add_special_tokens is None:
            ids = self.tokenizer.encode(text)
        else:
            ids = self.tokenizer.encode(text, add_special_tokens=add_special_tokens)
        bos = self.tokenizer.bos_token_id
        # lm_eval's hf model loads its tokenizer with add_bos_token=True, which makes any tokenizer add BOS; ours
        # is the generator's, so the BOS is added here instead
        if self.add_bos_token and add_special_tokens and bos is not None and ids[:1] != [bos]:
            ids = [bos] + ids
        return ids

    def _encode_pair(self, context: str, continuation: str) -> Tuple[List[int], List[int]]:
        """Context and continuation ids. The context's trailing whitespace moves to the continuation (tokenizers
        attach a space to the word after it), and the pair is tokenized as one text then split at the context's
        length, so the continuation's ids are those of the whole text. An empty context (or one of whitespace only,
        which lm_eval's hf model refuses for tokenizers without BOS) is the prefix token."""
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        if not context:
            continuation_ids = self.tok_encode(continuation, add_special_tokens=False)
            if continuation_ids[:1] == [self.prefix_token_id]:
                return continuation_ids[:1], continuation_ids[1:]
            return [self.prefix_token_id], continuation_ids
        whole = self.tok_encode(context + continuation)
        context_ids = self.tok_encode(context)
        return context_ids, whole[len(context_ids):]

    # ------------------------------------------------------------------ the three request types

    def loglikelihood(self, requests: Sequence[Any], disable_tqdm: bool = False) -> List[Tuple[float, bool]]:
        """``(log p(continuation | context), whether greedy decoding yields the continuation)`` per request."""
        results = self._score([self._encode_pair(*request.args) for request in requests])
        for request, result in zip(requests, results):
            self.cache_hook.add_partial("loglikelihood", request.args, result)
        return results

    def loglikelihood_rolling(self, requests: Sequence[Any], disable_tqdm: bool = False) -> List[float]:
        """``log p(text)`` per request: the text's tokens cut into disjoint windows of at most ``max_length``
        predicted tokens, each window conditioned on as many preceding tokens as fit (the first on the prefix
        token), so every token is predicted once (lm_eval's rolling windows)."""
        windows: List[Tuple[List[int], List[int]]] = []
        owners: List[int] = []
        for index, request in enumerate(requests):
            (text,) = request.args
            for window in get_rolling_token_windows(token_list=self.tok_encode(text),
                                                    prefix_token=self.prefix_token_id,
                                                    max_seq_len=self.max_length, context_len=1):
                windows.append(make_disjoint_window(window))
                owners.append(index)
        totals = [0.0] * len(requests)
        for index, (logprob, _) in zip(owners, self._score(windows)):
            totals[index] += logprob
        for request, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    @torch.inference_mode()
    def generate_until(self, requests: Sequence[Any], disable_tqdm: bool = False) -> List[str]:
        """The continuation of each context, cut before the first ``until`` string (or the EOS token's text).

        Greedy unless ``do_sample`` (then sampling at ``temperature``, default 1 as in transformers, and ``top_p``;
        each request draws its seed from torch's global generator, which lm_eval seeds). A context longer than
        ``max_length - max_gen_toks`` tokens loses tokens from the left.
        """
        groups: Dict[str, List[int]] = {}  # requests with the same generation kwargs run together
        for index, request in enumerate(requests):
            groups.setdefault(repr(sorted(request.args[1].items())), []).append(index)
        texts: List[str] = [""] * len(requests)
        for indices in groups.values():
            contexts = [requests[i].args[0] for i in indices]
            for i, completion in zip(indices, self._generate(contexts, requests[indices[0]].args[1])):
                texts[i] = completion.text
                self.cache_hook.add_partial("generate_until", requests[i].args, completion.text)
        return texts

    def _generate(self, contexts: List[str], gen_kwargs: dict) -> List[Completion]:
        kwargs = normalize_gen_kwargs(gen_kwargs, self.max_gen_toks)
        sampling = bool(kwargs["do_sample"]) and float(kwargs.get("temperature", 1.0)) > 0
        unsupported = set(kwargs) - _GEN_KWARGS - (set() if sampling else _SAMPLING_ONLY)
        if unsupported:
            raise ValueError(f"generation kwargs {sorted(unsupported)} are not supported by nemo_customizer "
                             f"(supported: {', '.join(sorted(_GEN_KWARGS))})")
        max_tokens = int(kwargs["max_gen_toks"])
        room = self.max_length - max_tokens
        if room < 1:
            raise ValueError(f"max_gen_toks={max_tokens} leaves no room for a context in max_length="
                             f"{self.max_length} tokens")
        stop = list(kwargs["until"])
        eos_text = self.tokenizer.decode([self.tokenizer.eos_token_id])
        if eos_text not in stop:
            stop.append(eos_text)  # the EOS token's text ends a completion even when spelled out in plain tokens
        encoded = [self._encode_context(context) for context in contexts]
        self._warn_truncated(sum(len(ids) > room for ids in encoded), "contexts", room)
        prompts = [ids[-room:] or [self.prefix_token_id] for ids in encoded]  # the engine needs a token to continue
        options = dict(max_tokens=max_tokens, stop=stop, temperature=0.0, top_p=1.0, seed=None)
        if not sampling:
            return self.generator.complete_ids(prompts, batch_size=self.batch_size, **options)
        options.update(temperature=float(kwargs.get("temperature", 1.0)), top_p=float(kwargs.get("top_p", 1.0)))
        # one row at a time: a seed per request, so repeated requests give different samples that a seed replays
        return [self.generator.complete_ids([ids], **{**options, "seed": int(torch.randint(2**31 - 1, ()))})[0]
                for ids in prompts]

    def _encode_context(self, context: str) -> List[int]:
        # a generation context already starting with the BOS text (a rendered chat template) gets no special tokens
        bos_text = self.tokenizer.bos_token
        return self._encode(context, False if bos_text and context.startswith(bos_text) else self.add_bos_token)

    def _score(self, pairs: Sequence[Tuple[List[int], List[int]]]) -> List[Tuple[float, bool]]:
        """``(sum of logprobs, all greedy)`` of each continuation; context + continuation beyond ``max_length + 1``
        tokens loses context tokens from the left (the model sees at most ``max_length`` inputs)."""
        sequences, masks = [], []
        for k, (context, continuation) in enumerate(pairs):
            if not 0 < len(continuation) <= self.max_length:
                raise ValueError(f"request {k}: the continuation is {len(continuation)} tokens; it needs 1 to "
                                 f"max_length={self.max_length}")
            ids = (context + continuation)[-(self.max_length + 1):]
            sequences.append(ids)
            masks.append([0] * (len(ids) - len(continuation)) + [1] * len(continuation))
        self._warn_truncated(sum(len(c) + len(t) > self.max_length + 1 for c, t in pairs), "requests",
                             self.max_length + 1)
        scores = score_targets(self.generator.model, sequences, masks, device=self.device,
                               batch_tokens=self.batch_size * self.max_length)
        return [(score.total, score.all_greedy) for score in scores]

    @staticmethod
    def _warn_truncated(count: int, what: str, limit: int) -> None:
        if count:
            logger.warning("%d %s were longer than %d tokens and lost tokens from the left", count, what, limit)

    # ------------------------------------------------------------------ chat templates

    def chat_template(self, chat_template: Union[bool, str] = False) -> Optional[str]:
        """The tokenizer's chat template (``model.chat_template`` of the config overrides it), or None when
        ``chat_template`` is off. A template name cannot pick another: a tokenizer holds one template here."""
        if not chat_template:
            return None
        template = self.tokenizer.chat_template
        if not template:
            raise ValueError("the tokenizer has no chat template: set model.chat_template in the config")
        if isinstance(chat_template, str):
            logger.warning("chat_template=%r: using the tokenizer's only template", chat_template)
        return template

    def apply_chat_template(self, chat_history: List[Dict[str, str]], add_generation_prompt: bool = True) -> str:
        """``chat_history`` rendered as text with the tokenizer's template: ready for the assistant's turn, or
        (``add_generation_prompt=False``) continuing its last message. A template that refuses a system message
        renders the conversation without it, as lm_eval's hf model does."""
        import jinja2

        def render(messages):
            return self.tokenizer.apply_chat_template(messages, tokenize=False,
                                                      add_generation_prompt=add_generation_prompt,
                                                      continue_final_message=not add_generation_prompt)

        try:
            return render(chat_history)
        except jinja2.exceptions.TemplateError:
            logger.warning("the chat template failed; rendering the conversation without its system message")
            return render([message for message in chat_history if message["role"] != "system"])


def _device_from_cli(device: str) -> str:
    """lm_eval's ``--device`` (default ``cuda:0``) as our config's device: CUDA when there is one, like its hf
    model, which falls back to the CPU."""
    if device == "cpu":
        return "cpu"
    if device in ("cuda", "cuda:0"):
        return "auto"
    raise ValueError(f"--device {device}: nemo_customizer runs on cpu or cuda (its first GPU); "
                     "pass device=cpu|cuda|auto in --model_args")


if __name__ == "__main__":  # python -m nemo_customizer.evaluation.lm_eval_model: lm_eval's CLI, this model included
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()
