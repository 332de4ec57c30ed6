"""OpenAI request bodies (pydantic) and response / stream-chunk bodies (plain dicts).

Field names and defaults follow OpenAI's API reference (``temperature`` defaults to 1, completions' ``max_tokens``
to 16). Fields we cannot honour with a non-default value (``logprobs``, penalties, ``logit_bias``, ``echo``,
``suffix``, JSON ``response_format``) are refused with a 400 naming the field rather than silently ignored; fields
that change nothing here (``user``, ``parallel_tool_calls``) and unknown fields that newer clients send are ignored.
"""

from __future__ import annotations

import secrets
import time
from typing import Any, Dict, List, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field

from nemo_customizer.data.chat_rows import ROLES
from nemo_customizer.serving.errors import bad_request


class StreamOptions(BaseModel):
    include_usage: bool = False


class _SamplingRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1)
    stop: Optional[Union[str, List[str]]] = None
    seed: Optional[int] = None
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    presence_penalty: Optional[float] = None
    frequency_penalty: Optional[float] = None
    logit_bias: Optional[Dict[str, float]] = None
    user: Optional[str] = None

    def stops(self) -> List[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > 16:
            raise bad_request(f"stop has {len(stops)} strings; at most 16 are allowed", param="stop")
        return [s for s in stops if s]

    def check_supported(self) -> None:
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name):
                raise bad_request(f"{name} is not supported by this server; leave it unset or 0", param=name)
        if self.logit_bias:
            raise bad_request("logit_bias is not supported by this server", param="logit_bias")

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_SamplingRequest):
    """``POST /v1/completions``."""

    prompt: Union[str, List[str], List[int], List[List[int]]]
    max_tokens: Optional[int] = Field(16, ge=1)
    echo: bool = False
    logprobs: Optional[int] = None
    suffix: Optional[str] = None
    best_of: Optional[int] = None

    def check_supported(self) -> None:
        super().check_supported()
        for name in ("logprobs", "suffix"):
            if getattr(self, name) is not None:
                raise bad_request(f"{name} is not supported by this server", param=name)
        if self.echo:
            raise bad_request("echo is not supported by this server", param="echo")
        if self.best_of is not None and self.best_of != self.n:
            raise bad_request("best_of other than n is not supported by this server", param="best_of")

    def prompts(self) -> List[Union[str, List[int]]]:
        """The prompts as a list: strings, or lists of token ids."""
        prompt = self.prompt
        if isinstance(prompt, str):
            return [prompt]
        if not prompt:
            raise bad_request("prompt is an empty list; send a string, a list of strings, or token ids",
                              param="prompt")
        if all(isinstance(item, int) for item in prompt):
            return [list(prompt)]
        return list(prompt)


class ChatCompletionRequest(_SamplingRequest):
    """``POST /v1/chat/completions``."""

    messages: List[Dict[str, Any]] = Field(min_length=1)
    tools: Optional[List[Dict[str, Any]]] = None
    tool_choice: Optional[Union[Literal["none", "auto", "required"], Dict[str, Any]]] = None
    max_tokens: Optional[int] = Field(None, ge=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    logprobs: Optional[bool] = None
    top_logprobs: Optional[int] = None
    response_format: Optional[Dict[str, Any]] = None
    parallel_tool_calls: Optional[bool] = None

    def check_supported(self) -> None:
        super().check_supported()
        if self.logprobs or self.top_logprobs:
            raise bad_request("logprobs are not supported by this server", param="logprobs")
        if self.response_format and self.response_format.get("type", "text") != "text":
            raise bad_request("response_format other than text is not supported by this server",
                              param="response_format")
        if self.tool_choice is not None and self.tool_choice not in ("none", "auto"):
            raise bad_request("tool_choice 'required' or a named function is not supported by this server; use "
                              "'auto' or 'none'", param="tool_choice")

    def template_messages(self) -> List[Dict[str, Any]]:
        """The messages as chat templates expect them: OpenAI content parts (``[{"type": "text", "text": ...}]``)
        joined into one string; any other content is refused, and so is a role that training data may not have (a
        template would render it as text and the model generate on until its token limit)."""
        messages = []
        for k, message in enumerate(self.messages):
            role = message.get("role")
            if isinstance(role, str) and role not in ROLES:  # a missing or non-string role: ChatTemplate refuses it
                raise bad_request(f"Invalid value for messages[{k}].role: {role!r}. Supported values are: "
                                  f"{', '.join(map(repr, ROLES))}.", param=f"messages[{k}].role", code="invalid_value")
            content = message.get("content")
            if isinstance(content, list):
                if not all(isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)
                           for part in content):
                    raise bad_request(f"messages[{k}].content: only text parts ({{'type': 'text', 'text': ...}}) "
                                      "are supported by this server", param="messages")
                message = {**message, "content": "\n".join(part["text"] for part in content)}
            elif content is not None and not isinstance(content, str):
                raise bad_request(f"messages[{k}].content must be a string, a list of text parts, or null",
                                  param="messages")
            messages.append(message)
        return messages

    def requested_max_tokens(self) -> Optional[int]:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class LoadAdapterRequest(BaseModel):
    """``POST /v1/load_lora_adapter`` (vLLM's runtime LoRA endpoint)."""

    lora_name: str
    lora_path: str


class UnloadAdapterRequest(BaseModel):
    lora_name: str


def new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(12)}"


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int) -> Dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def model_card(model_id: str, *, created: int, root: str, parent: Optional[str]) -> Dict[str, Any]:
    return {"id": model_id, "object": "model", "created": created, "owned_by": "nemo_customizer", "root": root,
            "parent": parent}


def completion_body(request_id: str, created: int, model: str, choices: List[Dict[str, Any]],
                    usage_: Optional[Dict[str, int]], *, chunk: bool = False) -> Dict[str, Any]:
    body = {"id": request_id, "object": "text_completion", "created": created, "model": model, "choices": choices}
    if usage_ is not None or not chunk:
        body["usage"] = usage_
    return body


def completion_choice(index: int, text: str, finish_reason: Optional[str]) -> Dict[str, Any]:
    return {"index": index, "text": text, "logprobs": None, "finish_reason": finish_reason}


def chat_body(request_id: str, created: int, model: str, choices: List[Dict[str, Any]],
              usage_: Optional[Dict[str, int]], *, chunk: bool = False) -> Dict[str, Any]:
    body = {"id": request_id, "object": "chat.completion.chunk" if chunk else "chat.completion", "created": created,
            "model": model, "choices": choices}
    if usage_ is not None or not chunk:
        body["usage"] = usage_
    return body


def chat_choice(index: int, message: Dict[str, Any], finish_reason: Optional[str]) -> Dict[str, Any]:
    message = {"role": "assistant", "content": message.get("content"), **{
        key: value for key, value in message.items() if key in ("reasoning_content", "tool_calls")}}
    return {"index": index, "message": message, "logprobs": None, "finish_reason": finish_reason}


def chat_delta(index: int, delta: Dict[str, Any], finish_reason: Optional[str] = None) -> Dict[str, Any]:
    return {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}


def tool_call_deltas(tool_calls: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Whole tool calls as one stream delta each (``index`` tells the client which call a delta extends)."""
    return [{"index": i, "id": call["id"], "type": "function", "function": dict(call["function"])}
            for i, call in enumerate(tool_calls)]
