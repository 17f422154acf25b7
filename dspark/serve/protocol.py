"""OpenAI request schemas (completions, chat completions), the OpenAI error body, and the mapping
from the engine's and `SamplingParams`' validation messages to the request field they name.

Field names follow the OpenAI API; `top_k` and `stop_token_ids` are extensions (as in vLLM).
Sampling values are not range-checked here: `SamplingParams(...)` and `Engine.add_request` are the
one place that does it, and `param_of` reads the field back out of their message.
"""

from __future__ import annotations

import re
import time
import uuid
from typing import Union

from pydantic import BaseModel, ConfigDict, Field

Stop = Union[str, list[str], None]


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: int | None = None  # None: as many as the context allows (capped by --default-max-tokens)
    temperature: float | None = None  # None: 1, as OpenAI
    top_p: float | None = None
    top_k: int | None = None  # extension; 0 or -1 = off
    n: int = 1
    seed: int | None = None
    stop: Stop = None
    stop_token_ids: list[int] | None = None  # extension: stop at these token ids (besides the model's eos)
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = None  # accepted only at 0 (not implemented)
    frequency_penalty: float | None = None  # accepted only at 0 (not implemented)
    user: str | None = None


class CompletionRequest(_Sampling):
    prompt: Union[str, list[str], list[int], list[list[int]]]
    logprobs: int | None = None  # the sampled token's logprob per token; top alternatives are not returned
    echo: bool = False  # accepted only false


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: str
    content: Union[str, list[dict], None] = None

    def text(self) -> str:
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        parts = []
        for part in self.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ValueError("messages: only text content parts are supported")
            parts.append(part["text"])
        return "".join(parts)


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None  # the newer name of max_tokens
    logprobs: bool = False
    top_logprobs: int | None = None  # accepted only 0 (alternatives are not returned)


class APIError(Exception):
    """An error answered with the OpenAI body `{"error": {"message", "type", "param", "code"}}`."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


# The first word of a SamplingParams / Engine.add_request message → the request field it is about.
_FIELDS = {"max_tokens", "temperature", "top_p", "top_k", "seed", "stop_token_ids"}


def param_of(message: str, prompt_field: str) -> str | None:
    """The request field a validation message names (None if it names none)."""
    if message.startswith("stop token ids") or message.startswith("at most") and "stop token" in message:
        return "stop_token_ids"
    if message.startswith("prompt") or message.startswith("empty prompt") or "cache pages" in message:
        return prompt_field
    word = re.match(r"\w+", message)
    return word.group(0) if word and word.group(0) in _FIELDS else None


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())
