"""The engine thread under faults and load: clients that disconnect mid-stream give their pages back,
a burst past the queue bound answers 429 and the server stays healthy, an invalid request between
valid ones leaves them untouched, stopping the server fails requests in flight (no hang), and
concurrent streams with mixed settings each equal the same request run alone, none lost or duplicated,
with /metrics adding up to what the clients received."""

from __future__ import annotations

import asyncio
import random
import threading
import time

import httpx
import openai
import pytest

from dspark.llm import LLM
from tests.helpers.serving import async_client, client, metric, metrics, serve, wait_idle

PROMPT = "def fibonacci(n):"


@pytest.fixture(scope="module")
def llm():
    return LLM("tiny", method="mtp", max_batch=4, max_seq_len=256)


@pytest.fixture
def server(llm):
    s = serve(llm, max_waiting=2)
    yield s
    s.stop()


def first_chunks(c, n: int, max_tokens: int = 200, read: int = 4):
    """n long streams (seeded: the same tokens every run), the first `read` of them read up to their
    first chunk (so they hold slots and pages); the others are queued (the response has started)."""
    streams = []
    for i in range(n):
        s = c.completions.create(model="tiny", prompt=f"{PROMPT} {i}", max_tokens=max_tokens, temperature=1.0,
                                 seed=i, stream=True)
        if i < read:
            next(iter(s))
        streams.append(s)
    return streams


def test_disconnects_free_slots_and_pages(server):
    engine = server.llm.engine
    free = engine.cache.free_pages
    c = client(server)
    streams = first_chunks(c, 3)
    assert engine.cache.free_pages < free
    for s in streams:
        s.close()
    wait_idle(server)
    assert engine.cache.free_pages == free
    m = metrics(server)
    assert metric(m, "dspark:request_success_total", finished_reason="abort") == 3
    assert metric(m, "dspark:kv_cache_free_pages") == free
    out = c.completions.create(model="tiny", prompt=PROMPT, max_tokens=8, temperature=0)
    assert out.choices[0].finish_reason in ("length", "stop")


def test_a_non_streamed_request_whose_client_times_out_is_aborted(server):
    free = server.llm.engine.cache.free_pages
    with pytest.raises(openai.APITimeoutError):
        client(server, timeout=0.3).completions.create(model="tiny", prompt=PROMPT, max_tokens=230, temperature=1.0,
                                                       seed=0)
    wait_idle(server)
    assert metric(metrics(server), "dspark:request_success_total", finished_reason="abort") == 1
    assert server.llm.engine.cache.free_pages == free


def test_burst_past_the_queue_bound_answers_429(server):
    c = client(server)
    streams = first_chunks(c, 6)  # 4 slots + 2 waiting places: full
    for _ in range(3):
        with pytest.raises(openai.RateLimitError) as e:
            c.completions.create(model="tiny", prompt=PROMPT, max_tokens=4)
        assert e.value.status_code == 429 and e.value.body["code"] == "rate_limit_exceeded"
    for s in streams:
        s.close()
    wait_idle(server)
    assert metric(metrics(server), "dspark:request_rejected_total") == 3
    assert httpx.get(server.url + "/health").status_code == 200
    assert c.completions.create(model="tiny", prompt=PROMPT, max_tokens=4, temperature=0).choices[0].text is not None


def test_an_invalid_request_between_valid_ones_disturbs_none(server):
    c = client(server)
    kw = dict(model="tiny", max_tokens=16, temperature=0)
    alone = [c.completions.create(prompt=f"{PROMPT} {i}", **kw).choices[0].text for i in range(3)]
    streams = [c.completions.create(prompt=f"{PROMPT} {i}", stream=True, **kw) for i in range(3)]
    with pytest.raises(openai.BadRequestError) as e:
        c.completions.create(model="tiny", prompt=PROMPT, max_tokens=4, top_p=1.5)
    assert e.value.body["param"] == "top_p"
    assert ["".join(ch.choices[0].text for ch in s) for s in streams] == alone


def test_stopping_the_server_fails_requests_in_flight(llm):
    server = serve(llm)
    c = client(server, timeout=30)
    streams = first_chunks(c, 2, max_tokens=200)
    errors = []

    def whole():
        try:
            c.completions.create(model="tiny", prompt=PROMPT, max_tokens=200, temperature=1.0,
                                 extra_body={"stop_token_ids": []})
        except openai.APIError as e:
            errors.append(e)

    t = threading.Thread(target=whole)
    t.start()
    while len(server.worker.driver.pending) < 3:  # the third is queued in the engine
        time.sleep(0.01)
    server.stop()
    t.join(30)
    assert not t.is_alive() and len(errors) == 1
    for s in streams:
        with pytest.raises(openai.APIError, match="shutting down"):
            for _ in s:
                pass
    assert not server.worker.alive and not server.worker.driver.pending


def load(server, count: int, seed: int = 0):
    """`count` concurrent streams with mixed sampling settings and lengths; each greedy one equals the
    same request run alone; none lost or duplicated; /metrics adds up to what the clients received."""
    rng = random.Random(seed)
    requests = []
    for i in range(count):
        kw = dict(model="tiny", prompt=f"{PROMPT} #{i} " + "x" * rng.randrange(0, 20), max_tokens=rng.randrange(4, 28))
        kind = i % 3
        if kind == 1:
            kw.update(temperature=0.8, top_p=0.9, seed=i)
        elif kind == 2:
            kw.update(temperature=1.2, seed=i, extra_body={"top_k": 20})
        else:
            kw.update(temperature=0)
        requests.append(kw)
    before = metrics(server)

    async def one(c, kw):
        stream = await c.completions.create(**kw, stream=True, stream_options={"include_usage": True})
        text, ids, usage = [], set(), None
        async for chunk in stream:
            ids.add(chunk.id)
            for ch in chunk.choices:
                text.append(ch.text)
            usage = chunk.usage or usage
        return "".join(text), ids, usage

    async def main():
        c = async_client(server)
        async with c:
            return await asyncio.gather(*(one(c, kw) for kw in requests))

    results = asyncio.run(main())
    after = metrics(server)
    assert len(results) == count
    ids = [r[1] for r in results]
    assert all(len(i) == 1 for i in ids) and len(set.union(*ids)) == count  # one id each, all distinct
    c = client(server)
    for kw, (text, _, usage) in zip(requests, results):
        assert 1 <= usage.completion_tokens <= kw["max_tokens"]
        if kw["temperature"] == 0:
            assert text == c.completions.create(**kw).choices[0].text
    delta = {name: metric(after, name) - metric(before, name) for name in (
        "dspark:generation_tokens_total", "dspark:request_success_total", "dspark:prompt_tokens_total",
        "dspark:time_to_first_token_seconds_count")}
    assert delta["dspark:generation_tokens_total"] == sum(r[2].completion_tokens for r in results)
    assert delta["dspark:prompt_tokens_total"] == sum(r[2].prompt_tokens for r in results)
    assert delta["dspark:request_success_total"] == count == delta["dspark:time_to_first_token_seconds_count"]
    rounds = metric(after, "dspark:spec_decode_num_drafts")
    assert rounds > 0 and metric(after, "dspark:spec_decode_num_accepted_tokens") <= metric(
        after, "dspark:spec_decode_num_draft_tokens")
    assert metric(after, "dspark:spec_decode_mean_tau") == pytest.approx(
        metric(after, "dspark:spec_decode_num_emitted_tokens") / rounds)


def test_32_concurrent_streams(llm):  # ~8 s on 2 CPU cores: in the default tier
    server = serve(llm, max_waiting=64)
    try:
        load(server, 32, seed=1)
    finally:
        server.stop()
