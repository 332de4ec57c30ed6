"""What the routes serve: the generator (one copy of the base weights), its adapters, the scheduler, the limits.

No FastAPI here: ``build_service`` is also what tests and the load script use to run a server in-process.
"""

from __future__ import annotations

import dataclasses
import os
import threading
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

from jinja2 import TemplateError

from nemo_customizer.config import Config, ConfigError, ServingConfig, validate_config, validate_serving
from nemo_customizer.inference.chat import ChatTemplate
from nemo_customizer.inference.generator import Generator
from nemo_customizer.serving.adapters import AdapterRegistry
from nemo_customizer.serving.errors import APIError, bad_request
from nemo_customizer.serving.scheduler import Scheduler

API_KEY_ENV = "NEMO_CUSTOMIZER_API_KEY"


@dataclasses.dataclass
class Service:
    generator: Generator
    registry: AdapterRegistry
    scheduler: Scheduler
    settings: ServingConfig
    api_key: Optional[str]
    """The key clients must send (``serving.api_key``, else ``$NEMO_CUSTOMIZER_API_KEY``); None: no key."""
    created: int = dataclasses.field(default_factory=lambda: int(time.time()))
    # HF fast tokenizers are not safe to call from several threads at once ("Already borrowed"); handlers tokenize
    # in a thread pool, so they take turns
    _tokenizer_lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)

    def start(self) -> None:
        self.scheduler.start()

    def stop(self) -> None:
        self.scheduler.stop()

    def close(self) -> None:
        """Release the model and its parallel state (after ``stop``)."""
        self.generator.close()

    def encode(self, prompt: Union[str, List[int]]) -> List[int]:
        """A completions prompt's token ids (a string is tokenized as ``generate()`` does; ids are checked)."""
        if isinstance(prompt, str):
            with self._tokenizer_lock:
                ids = self.generator.encode(prompt)
        else:
            vocab = self.generator.architecture.vocab_size if self.generator.architecture else len(
                self.generator.tokenizer)
            bad = [i for i in prompt if not 0 <= i < vocab]
            if bad:
                raise bad_request(f"prompt token id {bad[0]} is outside the vocabulary (0..{vocab - 1})",
                                  param="prompt")
            ids = list(prompt)
        if not ids:
            raise bad_request("the prompt is empty (no tokens); send at least one character", param="prompt")
        return ids

    def render_chat(self, messages: Sequence[Dict[str, Any]],
                    tools: Optional[Sequence[Dict[str, Any]]]) -> Tuple[List[int], ChatTemplate]:
        """Token ids of the conversation in the model's chat template; a 400 for what the template cannot render."""
        try:
            with self._tokenizer_lock:
                return self.generator.chat_prompt(messages, tools)
        except ValueError as exc:  # ChatTemplate's own checks: their messages say what to change
            raise bad_request(str(exc), param="tools" if tools and "tool" in str(exc) else "messages") from exc
        except (TypeError, KeyError, AttributeError, IndexError, TemplateError) as exc:
            # the template itself failed on this input (a missing field, a number where it adds strings, ...)
            raise bad_request(f"the chat template could not render these messages ({type(exc).__name__}: {exc}); "
                              "check each message's role, content and tool calls", param="messages") from exc

    def check_max_tokens(self, max_tokens: int) -> int:
        if max_tokens > self.settings.max_tokens:
            raise bad_request(f"max_tokens={max_tokens} is above this server's limit of {self.settings.max_tokens} "
                              "(serving.max_tokens)", param="max_tokens")
        return max_tokens

    def check_choices(self, count: int) -> None:
        if count > self.settings.max_choices:
            raise bad_request(f"this request asks for {count} completions (n × prompts); this server allows at most "
                              f"{self.settings.max_choices} (serving.max_choices)", param="n")

    def check_runtime_adapters(self) -> None:
        if not self.settings.allow_runtime_adapters:
            raise APIError(403, "loading and unloading adapters at runtime is disabled on this server "
                                "(serving.allow_runtime_adapters=false)", code="forbidden")

    def unload_adapter(self, name: str) -> None:
        with self.scheduler.lock:  # no step runs meanwhile, so no row is using the weights being removed
            busy = self.scheduler.rows_using(name)
            if busy:
                raise APIError(409, f"adapter {name!r} is in use by {busy} running or queued completions; retry "
                                    "when they finish", param="lora_name", code="adapter_in_use")
            self.registry.unload(name)


def build_service(cfg: Config) -> Service:
    """Load the model of ``cfg``, attach the adapter machinery, and (with ``serving.preload_adapters``) load every
    adapter of ``serving.adapters_dir``. Configuration mistakes raise ConfigError."""
    settings = cfg.serving
    validate_config(cfg, training=False)
    validate_serving(settings)
    generator = Generator.from_config(cfg)
    try:
        lora = generator.attach_adapters(settings.max_lora_rank)
        try:
            registry = AdapterRegistry(lora, settings.model_name or cfg.model.name, settings.adapters_dir)
            if settings.preload_adapters:
                registry.preload()
        except (FileNotFoundError, APIError) as exc:
            raise ConfigError(str(exc)) from exc
        scheduler = Scheduler(generator, settings.max_batch_size)
    except BaseException:
        generator.close()
        raise
    return Service(generator=generator, registry=registry, scheduler=scheduler, settings=settings,
                   api_key=settings.api_key or os.environ.get(API_KEY_ENV) or None)
