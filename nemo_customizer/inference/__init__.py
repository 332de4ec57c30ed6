"""Generation: a KV-cached completion engine over the Megatron model, with an optional LoRA adapter."""

from __future__ import annotations

from typing import List, Optional

from nemo_customizer.config import Config
from nemo_customizer.inference.generator import Completion, Generator


def generate(prompt: str, *, config: Config, adapter: Optional[str] = None, max_tokens: int = 128,
             temperature: float = 0.0, top_p: float = 1.0, stop: Optional[List[str]] = None, seed: int = 0) -> str:
    """Complete one prompt and return the text: loads the model (and adapter), completes, releases everything.

    For many prompts, keep a :class:`Generator` open instead of paying the model load per prompt.
    """
    with Generator.from_config(config, adapter=adapter) as generator:
        return generator.complete(prompt, max_tokens=max_tokens, temperature=temperature, top_p=top_p, stop=stop,
                                  seed=seed).text


__all__ = ["Completion", "Generator", "generate"]
