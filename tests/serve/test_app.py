"""The OpenAI endpoints through the official `openai` client: completions and chat, streamed or not
(the streamed text equals the non-streamed one for the same seed), greedy output equal to
`dspark.LLM(...).generate`, /v1/models, /health, the API key, and OpenAI error bodies naming the field."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from dspark.llm import LLM
from dspark.serve.app import chat_template_of
from tests.helpers.serving import KEY, client, serve

PROMPTS = ["def fibonacci(n):", "héllo wörld"]


@pytest.fixture(scope="module")
def tiny():
    llm = LLM("tiny", max_batch=4, max_seq_len=256)
    expected = llm.generate(PROMPTS, max_tokens=20)  # greedy, before the server's thread owns the engine
    server = serve(llm, api_key=KEY, max_waiting=8)
    yield server, expected
    server.stop()


def streamed(stream, chat: bool = False) -> tuple[str, str | None]:
    parts, reason = [], None
    for chunk in stream:
        for c in chunk.choices:
            parts.append((c.delta.content or "") if chat else c.text)
            reason = c.finish_reason or reason
    return "".join(parts), reason


def test_greedy_completions_equal_llm_generate(tiny):
    server, expected = tiny
    c = client(server)
    out = c.completions.create(model="tiny", prompt=PROMPTS, max_tokens=20, temperature=0)
    assert [ch.text for ch in out.choices] == [e.text for e in expected]
    assert [ch.index for ch in out.choices] == [0, 1]
    assert out.usage.completion_tokens == sum(len(e.token_ids) for e in expected)
    assert out.object == "text_completion" and out.model == "tiny"


@pytest.mark.parametrize("temperature,seed", [(0.0, None), (0.9, 7)], ids=["greedy", "sampled"])
def test_completion_stream_equals_non_stream(tiny, temperature, seed):
    server, _ = tiny
    c = client(server)
    kw = dict(model="tiny", prompt=PROMPTS[0], max_tokens=24, temperature=temperature, top_p=0.95, seed=seed,
              extra_body={"top_k": 50})
    whole = c.completions.create(**kw)
    text, reason = streamed(c.completions.create(**kw, stream=True))
    assert text == whole.choices[0].text and reason == whole.choices[0].finish_reason
    chunks = list(c.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_n_choices_sample_with_seed_plus_index(tiny):
    server, _ = tiny
    c = client(server)
    two = c.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=12, temperature=1.0, seed=3, n=2)
    first = c.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=12, temperature=1.0, seed=3)
    second = c.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=12, temperature=1.0, seed=4)
    assert [ch.text for ch in two.choices] == [first.choices[0].text, second.choices[0].text]


def test_chat_stream_equals_non_stream_with_logprobs(tiny):
    server, _ = tiny
    c = client(server)
    kw = dict(model="tiny", messages=[{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}],
              max_tokens=16, temperature=0.7, seed=1)
    whole = c.chat.completions.create(**kw, logprobs=True)
    msg = whole.choices[0].message
    assert msg.role == "assistant" and whole.object == "chat.completion"
    assert len(whole.choices[0].logprobs.content) == whole.usage.completion_tokens
    assert all(lp.logprob <= 0 for lp in whole.choices[0].logprobs.content)
    chunks = list(c.chat.completions.create(**kw, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == msg.content
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason


def test_stop_strings_and_stop_token_ids(tiny):
    server, expected = tiny
    c = client(server)
    text, ids = expected[0].text, expected[0].token_ids
    cut = text[len(text) // 2:len(text) // 2 + 2]
    kw = dict(model="tiny", prompt=PROMPTS[0], max_tokens=20, temperature=0, stop=[cut])
    whole = c.completions.create(**kw)
    assert whole.choices[0].text == text[:text.index(cut)] and whole.choices[0].finish_reason == "stop"
    assert streamed(c.completions.create(**kw, stream=True)) == (whole.choices[0].text, "stop")
    by_id = c.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=20, temperature=0,
                                 extra_body={"stop_token_ids": [ids[3]]})
    assert by_id.choices[0].finish_reason == "stop" and by_id.usage.completion_tokens == ids.index(ids[3])


def test_models_health_and_api_key(tiny):
    server, _ = tiny
    assert [m.id for m in client(server).models.list().data] == ["tiny"]
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}
    with pytest.raises(openai.AuthenticationError) as e:
        client(server, key="wrong").completions.create(model="tiny", prompt="x", max_tokens=2)
    assert e.value.status_code == 401 and e.value.body["code"] == "invalid_api_key"
    assert httpx.post(server.url + "/v1/completions", json={"model": "tiny", "prompt": "x"}).status_code == 401


@pytest.mark.parametrize("fields,param", [
    ({"model": "gpt-4"}, "model"),
    ({"temperature": -1}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"top_k": -2}, "top_k"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"seed": -1}, "seed"),
    ({"n": 0}, "n"),
    ({"max_tokens": 10**6}, "prompt"),
    ({"stop": [""]}, "stop"),
    ({"prompt": ""}, "prompt"),
    ({"temperature": "hot"}, "temperature"),
    ({"stop_token_ids": [10**7]}, "stop_token_ids"),
], ids=lambda v: v if isinstance(v, str) else "-".join(v))
def test_bad_requests_name_the_field(tiny, fields, param):
    server, _ = tiny
    body = {"model": "tiny", "prompt": "x", "max_tokens": 4, **fields}
    r = httpx.post(server.url + "/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["param"] == param
    assert error["type"] == "invalid_request_error" and error["message"]


def test_malformed_json_and_chat_errors(tiny):
    server, _ = tiny
    auth = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    r = httpx.post(server.url + "/v1/completions", content=b'{"model": "tiny", "prompt": ', headers=auth)
    assert r.status_code == 400 and r.json()["error"]["code"] == "json_invalid"
    r = httpx.post(server.url + "/v1/chat/completions", json={"model": "tiny", "messages": []}, headers=auth)
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    with pytest.raises(openai.BadRequestError) as e:
        client(server).chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}],
                                               max_completion_tokens=0)
    assert e.value.body["param"] == "max_completion_tokens"


def test_nano_greedy_over_http_equals_llm_generate():
    llm = LLM("nano", method="dspark", max_batch=2, max_seq_len=256)
    expected = llm.generate(PROMPTS[0], max_tokens=24)[0]
    server = serve(llm, name="nano")
    try:
        c = client(server)
        out = c.completions.create(model="nano", prompt=PROMPTS[0], max_tokens=24, temperature=0)
        assert out.choices[0].text == expected.text and out.usage.completion_tokens == len(expected.token_ids)
        text, _ = streamed(c.completions.create(model="nano", prompt=PROMPTS[0], max_tokens=24, temperature=0,
                                                stream=True))
        assert text == expected.text
    finally:
        server.stop()


def test_chat_template_comes_from_the_checkpoint(tmp_path):
    assert chat_template_of("nano") is None  # nano ships none: the plain template
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ messages[0].content }}"}))
    assert chat_template_of(tmp_path) == "{{ messages[0].content }}"
