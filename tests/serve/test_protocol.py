"""Validation messages of SamplingParams and Engine.add_request map to the OpenAI field they name."""

from __future__ import annotations

import pytest

from dspark.config import SamplingParams
from dspark.serve.protocol import APIError, param_of


@pytest.mark.parametrize("kw,param", [
    ({"temperature": -1.0}, "temperature"), ({"top_p": 0.0}, "top_p"), ({"top_k": -3}, "top_k"),
    ({"max_tokens": 0}, "max_tokens"), ({"seed": -1}, "seed"), ({"stop_token_ids": ["a"]}, "stop_token_ids"),
])
def test_sampling_messages_name_their_field(kw, param):
    with pytest.raises(ValueError) as e:
        SamplingParams(**kw)
    assert param_of(str(e.value), "prompt") == param


def test_engine_messages():
    assert param_of("stop token ids [99999] outside the vocabulary [0, 512)", "prompt") == "stop_token_ids"
    assert param_of("prompt (5) + max_tokens (9) needs 20 cache positions", "messages") == "messages"
    assert param_of("the request needs 9 cache pages; the cache has 4 in all", "prompt") == "prompt"
    assert param_of("something else", "prompt") is None


def test_error_body_is_openais():
    e = APIError(400, "bad", param="top_p", code="invalid_value")
    assert e.body() == {"error": {"message": "bad", "type": "invalid_request_error", "param": "top_p",
                                  "code": "invalid_value"}}
