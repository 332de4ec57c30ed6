"""Text completion with a Megatron GPT model (optionally with a LoRA adapter) and a KV cache.

Each prompt is prefilled alone into megatron-core's static KV cache at positions ``0..n-1`` (only its last
position is projected onto the vocabulary); generated tokens are then decoded one step at a time for a batch of
prompts together (``continuous.ContinuousBatch``, which the OpenAI server also drives, with rows joining and leaving
between steps). Sampling and stop rules live in ``sampling`` and ``Row``.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import List, Optional, Sequence

import torch

from nemo_customizer.config import ArchitectureConfig, Config
from nemo_customizer.inference.chat import ChatCompletion, ChatTemplate, chat_completion
from nemo_customizer.inference.continuous import ContinuousBatch
from nemo_customizer.inference.sampling import find_stop, next_token, stop_prefix_length
from nemo_customizer.inference.tool_calls import CONTROL_TOKENS

_REPLACEMENT = "\ufffd"  # what a decoder shows for incomplete UTF-8 bytes


@dataclasses.dataclass(frozen=True)
class Completion:
    """One generated completion, OpenAI-style."""

    text: str
    """Decoded completion (special tokens skipped), cut before the first stop string."""
    token_ids: List[int]
    """Every token the model generated, including the eos or the token that completed a stop string."""
    finish_reason: str
    """``"stop"`` (eos or a stop string) or ``"length"`` (``max_tokens`` or the model's context was reached)."""
    prompt_tokens: int
    completion_tokens: int


class Generator:
    """A model loaded once for many completions. Owns the parallel state it starts: ``close()`` (or ``with``)."""

    def __init__(self, model: torch.nn.Module, tokenizer, *, eos_ids: Sequence[int], max_context: int,
                 device: torch.device, architecture: Optional[ArchitectureConfig] = None):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.eos_ids = frozenset(eos_ids)
        self.max_context = max_context  # longest prompt + completion: the model's max_position_embeddings
        self.device = device
        self.architecture = architecture  # the ArchitectureConfig, needed to attach adapters later
        self.lora = None  # a MultiLoRA once attach_adapters() was called: each row then picks its adapter
        self._session = None  # the TrainingSession from_config built the model with (and its parallel state)
        self._chat_templates = {}  # tool_syntax override -> ChatTemplate, built on the first chat()
        self.has_adapter = False  # a single adapter attached with load_adapter()
        vocab = tokenizer.get_vocab()
        self._kept_ids = frozenset(vocab[token] for token in CONTROL_TOKENS if token in vocab)

    @classmethod
    def from_config(cls, cfg: Config, adapter: Optional[str] = None) -> "Generator":
        """Resolve ``cfg.model``'s checkpoint and tokenizer, start a one-process parallel state, build the model.

        ``adapter`` is an HF PEFT LoRA directory (``adapter_config.json`` + ``adapter_model.safetensors``), e.g. a
        customization job's ``adapter_path``; LoRA is attached with its r / lora_alpha / target_modules.
        """
        from nemo_customizer.checkpoints.resolve import load_tokenizer, resolve_model
        from nemo_customizer.peft.export import read_lora_config
        from nemo_customizer.training.session import TrainingSession

        resolved = resolve_model(cfg.model, cfg.cache_dir)
        tokenizer = load_tokenizer(resolved.tokenizer_dir, resolved.config.chat_template)
        if adapter is not None:
            read_lora_config(adapter)  # an unusable adapter fails before the model is built
        # One process holds the whole model: generation is latency-bound and small models fit one device. Its own
        # one-process world, also inside a launcher's job (the main rank evaluating after training).
        model_cfg = dataclasses.replace(resolved.config, tensor_parallel_size=1, pipeline_parallel_size=1,
                                        use_sequence_parallel=False)
        session = TrainingSession(dataclasses.replace(cfg, model=model_cfg), checkpoint_dir=resolved.checkpoint_dir,
                                  single_process=True)
        try:
            model = session.build_model(trainable=False)  # the base model; adapters are attached below
            arch = model_cfg.architecture
            eos = _eos_ids(tokenizer, arch, resolved.checkpoint_dir)
            generator = cls(model, tokenizer, eos_ids=eos, max_context=arch.max_position_embeddings,
                            device=session.device, architecture=arch)
            generator._session = session
            if adapter is not None:
                generator.load_adapter(adapter)
        except BaseException:
            session.close()
            raise
        return generator

    def load_adapter(self, adapter: str) -> None:
        """Attach the HF PEFT LoRA adapter in directory ``adapter`` (its r / lora_alpha / target_modules) to this
        generator's model: the base model becomes the customized one, without loading the base weights again."""
        from nemo_customizer.peft.apply import apply_lora
        from nemo_customizer.peft.export import load_peft_adapter, read_lora_config

        if self.lora is not None or self.has_adapter:
            raise ValueError("this generator already has an adapter attached")
        if self.architecture is None:
            raise ValueError("load_adapter needs the model's architecture: build the Generator with from_config")
        apply_lora(self.model, self.architecture, read_lora_config(adapter), seed=0)
        load_peft_adapter(self.model, adapter)
        self.model.eval()
        self.has_adapter = True

    def attach_adapters(self, max_rank: int):
        """Serve many LoRA adapters from this one copy of the base weights: wraps the model's linears once and
        returns the :class:`~nemo_customizer.peft.multi_lora.MultiLoRA` that loads adapters (rank ≤ ``max_rank``).

        Afterwards each :class:`Row` names its adapter (``new_row(..., adapter=name)``; None: the base model), and
        rows with different adapters decode in one batch.
        """
        from nemo_customizer.peft.multi_lora import MultiLoRA

        if self.lora is not None:
            raise ValueError("adapters are already attached to this generator")
        if self.architecture is None:
            raise ValueError("attach_adapters needs the model's architecture: build the Generator with from_config")
        self.lora = MultiLoRA(self.model, self.architecture, max_rank=max_rank)
        return self.lora

    def close(self) -> None:
        """Tear down the parallel state (and process group) started by ``from_config``."""
        if self._session is not None:
            self._session.close()
            self._session = None

    def __enter__(self) -> "Generator":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def encode(self, prompt: str) -> List[int]:
        """Prompt token ids exactly as training tokenizes a prompt (with the tokenizer's special tokens, e.g. BOS)."""
        return self.tokenizer(prompt, add_special_tokens=True)["input_ids"]

    def complete(self, prompt: str, *, max_tokens: int = 128, temperature: float = 0.0, top_p: float = 1.0,
                 stop: Optional[List[str]] = None, seed: Optional[int] = None) -> Completion:
        """Complete ``prompt``: greedy when ``temperature == 0``, else temperature + nucleus (``top_p``) sampling.

        Stops at an eos token, after ``max_tokens`` tokens, at the model's context length, or when the text
        contains a stop string (the text is cut before it). ``seed`` makes sampling reproducible.
        """
        return self.complete_batch([prompt], max_tokens=max_tokens, temperature=temperature, top_p=top_p,
                                   stop=stop, seed=seed)[0]

    @torch.inference_mode()
    def complete_batch(self, prompts: Sequence[str], *, max_tokens: int = 128, temperature: float = 0.0,
                       top_p: float = 1.0, stop: Optional[List[str]] = None, seed: Optional[int] = None,
                       batch_size: int = 16) -> List[Completion]:
        """``complete`` for every prompt, decoding up to ``batch_size`` of them together.

        Each prompt is prefilled on its own (exact, no padding); decoding then runs the rows as one batch, which
        on a CPU costs about as much per step as one row (a decode step is bound by reading the weights). Each row
        samples with its own generator seeded by ``seed``, so a row's result is what ``complete`` gives.
        """
        return self.complete_ids([self.encode(prompt) for prompt in prompts], max_tokens=max_tokens,
                                  temperature=temperature, top_p=top_p, stop=stop, seed=seed, batch_size=batch_size)

    def chat_prompt(self, messages: Sequence[dict], tools: Optional[Sequence[dict]] = None,
                    tool_syntax: Optional[str] = None) -> tuple[List[int], ChatTemplate]:
        """Token ids of the rendered conversation (generation prompt appended) and the template that rendered it."""
        template = self._chat_template(tool_syntax)
        return template.render(messages, tools), template

    @torch.inference_mode()
    def chat(self, messages: Sequence[dict], *, tools: Optional[Sequence[dict]] = None, max_tokens: int = 128,
             temperature: float = 0.0, top_p: float = 1.0, stop: Optional[List[str]] = None,
             seed: Optional[int] = None, tool_syntax: Optional[str] = None) -> ChatCompletion:
        """The assistant's reply to OpenAI-style ``messages``, optionally offering ``tools`` (OpenAI function specs).

        The conversation is rendered with the tokenizer's chat template (generation prompt appended) and completed
        like ``complete`` does, also stopping at the template's end-of-turn token. With ``tools``, tool calls in the
        reply are parsed into ``message["tool_calls"]`` using the syntax the template teaches (Hermes
        ``<tool_call>``, Llama 3 JSON, Mistral's ``[TOOL_CALLS]``; ``tool_syntax`` overrides the detection,
        ``"none"`` keeps them as text).
        A template that does not render tools is an error when ``tools`` are given. Where the template teaches
        ``<think>`` blocks (Qwen3), a reply's opening block is returned as ``message["reasoning_content"]``.
        """
        prompt_ids, template = self.chat_prompt(messages, tools, tool_syntax)
        completion, = self.complete_ids([prompt_ids], max_tokens=max_tokens, temperature=temperature, top_p=top_p,
                                         stop=stop, seed=seed, eos_ids=self.eos_ids | template.end_of_turn_ids)
        return chat_completion(completion, tool_syntax=template.tool_syntax if tools else None,
                               reasoning=template.reasoning)

    def _chat_template(self, tool_syntax: Optional[str]) -> ChatTemplate:
        # its probe renderings (end-of-turn token, tools support) run once per tool_syntax override
        if tool_syntax not in self._chat_templates:
            self._chat_templates[tool_syntax] = ChatTemplate(self.tokenizer, tool_syntax)
        return self._chat_templates[tool_syntax]

    def complete_ids(self, encoded: Sequence[List[int]], *, max_tokens: int, temperature: float, top_p: float,
                      stop: Optional[List[str]], seed: Optional[int], batch_size: int = 16,
                      eos_ids: Optional[frozenset] = None) -> List[Completion]:
        """``complete_batch`` on prompts given as token ids; ``eos_ids`` (default: the model's) end a completion."""
        rows = [self.new_row(ids, max_tokens=max_tokens, temperature=temperature, top_p=top_p, stop=stop, seed=seed,
                             eos_ids=eos_ids) for ids in encoded]  # checks every prompt before any work
        for first in range(0, len(rows), batch_size):
            batch = ContinuousBatch(self, max_rows=batch_size)
            for row in rows[first:first + batch_size]:
                batch.add(row)
            while batch.active:
                batch.step()
        return [row.completion() for row in rows]

    def new_row(self, prompt_ids: Sequence[int], *, max_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
                stop: Optional[List[str]] = None, seed: Optional[int] = None, eos_ids: Optional[frozenset] = None,
                adapter: Optional[str] = None) -> "Row":
        """The generation state of one prompt, for a :class:`~nemo_customizer.inference.continuous.ContinuousBatch`.

        Raises ValueError for an empty prompt or one that leaves no room in the model's context, a ``max_tokens``
        below 1, or an ``adapter`` that is not loaded (see ``attach_adapters``).
        """
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {max_tokens}")
        if not prompt_ids:
            raise ValueError("the prompt is empty (no tokens); it needs at least one token to continue from")
        if len(prompt_ids) > self.max_context - 1:
            raise ValueError(
                f"the prompt is {len(prompt_ids)} tokens, but the model's context is {self.max_context} tokens "
                f"(max_position_embeddings), which leaves room for a prompt of at most {self.max_context - 1} "
                "tokens; shorten the prompt.")
        if adapter is not None and (self.lora is None or adapter not in self.lora.adapters):
            raise ValueError(f"adapter {adapter!r} is not loaded in this generator")
        return Row(self, list(prompt_ids), max_tokens, temperature, top_p, stop, seed, eos_ids, adapter)

    def decode(self, token_ids: Sequence[int]) -> str:
        """Text of generated tokens, special tokens skipped (as OpenAI-compatible servers return it) except the
        tool-call markers of ``tool_calls.CONTROL_TOKENS``, which tell Mistral's calls from content."""
        token_ids = list(token_ids)
        if self._kept_ids.isdisjoint(token_ids):
            return self.tokenizer.decode(token_ids, skip_special_tokens=True)
        pieces, start = [], 0
        for at, token in enumerate(token_ids):
            if token in self._kept_ids:
                pieces += [self.tokenizer.decode(token_ids[start:at], skip_special_tokens=True),
                           self.tokenizer.convert_ids_to_tokens(token)]
                start = at + 1
        pieces.append(self.tokenizer.decode(token_ids[start:], skip_special_tokens=True))
        return "".join(pieces)


class Row:
    """One prompt's generation state: sampling, and the eos / stop string / length rules.

    Written by the thread that runs the model (``push``); other threads may read it and ``cancel`` it. ``done`` is
    set last, so a reader that sees it finished sees the whole result.
    """

    def __init__(self, owner: Generator, prompt_ids: List[int], max_tokens: int, temperature: float, top_p: float,
                 stop: Optional[List[str]], seed: Optional[int], eos_ids: Optional[frozenset] = None,
                 adapter: Optional[str] = None):
        self.owner = owner
        self.eos_ids = owner.eos_ids if eos_ids is None else eos_ids
        self.prompt_ids = prompt_ids
        self.adapter = adapter  # the MultiLoRA adapter this row decodes with; None: the base model
        self.budget = min(max_tokens, owner.max_context - len(prompt_ids))
        self.temperature, self.top_p, self.stop = temperature, top_p, stop or []
        self.sampler = None
        if temperature > 0:
            self.sampler = torch.Generator()
            self.sampler.manual_seed(seed) if seed is not None else self.sampler.seed()
        self.generated: List[int] = []
        self.stopped_at: Optional[int] = None
        self.cancelled = False
        self.done = False

    def cancel(self) -> None:
        """Stop generating (the client went away); the batch drops the row at its next step."""
        self.cancelled = True
        self.done = True

    def push(self, logits: torch.Tensor) -> None:
        """Choose the next token from ``logits`` (vocab,) unless finished, and apply the stop rules."""
        if self.done:
            return
        token = next_token(logits, temperature=self.temperature, top_p=self.top_p, generator=self.sampler)
        self.generated.append(token)
        if token in self.eos_ids:
            self.done = True
            return
        if self.stop:
            # A trailing U+FFFD can be a character whose remaining bytes are still to come: match stop strings
            # only on the settled text, which later tokens cannot change.
            settled = self.owner.decode(self.generated).rstrip(_REPLACEMENT)
            self.stopped_at = find_stop(settled, self.stop)
        # `cancelled` keeps a cancel() from another thread during this push from being overwritten
        self.done = self.cancelled or self.stopped_at is not None or len(self.generated) == self.budget

    def visible_text(self) -> str:
        """The text so far that more tokens cannot change: settled characters before any stop string, holding back
        a tail that may still grow into one (what a stream may send). Once done, the final text."""
        if self.done:
            return self.completion().text
        settled = self.owner.decode(self.generated).rstrip(_REPLACEMENT)
        return settled[:len(settled) - stop_prefix_length(settled, self.stop)]

    def completion(self) -> Completion:
        ended_on_eos = bool(self.generated) and self.generated[-1] in self.eos_ids
        text = self.owner.decode(self.generated[:-1] if ended_on_eos else self.generated)
        stopped_at = self.stopped_at
        if stopped_at is None and self.stop:
            stopped_at = find_stop(text, self.stop)  # a stop string completed by the held-back tail
        return Completion(text=text if stopped_at is None else text[:stopped_at], token_ids=list(self.generated),
                          finish_reason="stop" if ended_on_eos or stopped_at is not None else "length",
                          prompt_tokens=len(self.prompt_ids), completion_tokens=len(self.generated))


def _eos_ids(tokenizer, arch, checkpoint_dir: Optional[Path]) -> List[int]:
    """Every id that ends a completion: the tokenizer's eos, config.json's and generation_config.json's."""
    ids = {tokenizer.eos_token_id}
    ids.update(arch.eos_token_ids or [arch.eos_token_id])
    path = checkpoint_dir / "generation_config.json" if checkpoint_dir is not None else None
    if path is not None and path.is_file():
        listed = json.loads(path.read_text()).get("eos_token_id")
        ids.update(listed if isinstance(listed, list) else [listed])
    return sorted(i for i in ids if i is not None)
