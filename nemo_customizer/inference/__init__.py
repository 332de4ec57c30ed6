"""Generation: a KV-cached completion engine over the Megatron model, with an optional LoRA adapter."""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Union

from nemo_customizer.config import Config
from nemo_customizer.inference.chat import ChatCompletion
from nemo_customizer.inference.generator import Completion, Generator


def generate(prompt: Optional[str] = None, *, config: Config, messages: Optional[Sequence[Dict[str, Any]]] = None,
             tools: Optional[Sequence[Dict[str, Any]]] = None, adapter: Optional[str] = None, max_tokens: int = 128,
             temperature: float = 0.0, top_p: float = 1.0, stop: Optional[List[str]] = None, seed: int = 0,
             tool_syntax: Optional[str] = None) -> Union[str, Dict[str, Any]]:
    """Complete one ``prompt`` and return the text, or answer OpenAI-style chat ``messages`` (optionally offering
    ``tools``) and return the assistant message ``{"role": "assistant", "content": ..., "tool_calls": [...]}``.

    Loads the model (and adapter), generates, releases everything. For many requests, or for the finish reason and
    token counts, keep a :class:`Generator` open and call ``complete`` / ``chat``.
    """
    if (prompt is None) == (messages is None):
        raise ValueError("pass either a prompt or messages (a chat conversation), not both or neither")
    if tools and messages is None:
        raise ValueError("tools need messages: tool calling goes through the model's chat template")
    with Generator.from_config(config, adapter=adapter) as generator:
        if messages is not None:
            return generator.chat(messages, tools=tools, max_tokens=max_tokens, temperature=temperature, top_p=top_p,
                                  stop=stop, seed=seed, tool_syntax=tool_syntax).message
        return generator.complete(prompt, max_tokens=max_tokens, temperature=temperature, top_p=top_p, stop=stop,
                                  seed=seed).text


__all__ = ["ChatCompletion", "Completion", "Generator", "generate"]
