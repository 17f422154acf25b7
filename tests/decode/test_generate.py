"""The one host loop: all-or-nothing admission, per-step outputs, early close aborts and frees, and
`generate` / `collect` results in prompt order."""

from __future__ import annotations

import pytest

from dspark.config import EngineConfig, SamplingParams
from dspark.decode import Driver, Engine, collect, generate, run
from tests.helpers.drafters import greedy_ar, peaked_model, prompts


def engine(**kw) -> Engine:
    return Engine(peaked_model(), "ngram", config=EngineConfig(max_seq_len=128, **kw))


def test_collect_equals_generate_in_prompt_order():
    e = engine(max_batch=2)  # three prompts, two slots: the third waits, results stay in prompt order
    res = collect(e, [list(p) for p in prompts()], [SamplingParams(max_tokens=40)] * 3)
    assert [tuple(r.token_ids) for r in res] == list(greedy_ar())
    assert all(r.finish_reason == "length" for r in res)
    assert not e.has_unfinished() and len(e._free_slots) == 2


def test_a_bad_request_admits_nothing():
    e = engine()
    with pytest.raises(ValueError, match="outside the vocabulary"):
        run(e, [list(prompts()[0]), [1, 10**6]], [SamplingParams(max_tokens=4)] * 2)
    e.step()  # the aborted first request reports its end, and then nothing is left
    assert not e.has_unfinished()
    with pytest.raises(ValueError, match="sampling parameters"):
        run(e, [[1, 2]], [])


def test_closing_early_aborts_and_frees_slots_and_pages():
    e = engine(max_batch=3)
    free_pages = e.cache.free_pages
    steps = run(e, [list(p) for p in prompts()], [SamplingParams(max_tokens=40)] * 3)
    seen = [next(steps) for _ in range(4)]
    assert any(o.new_token_ids for outs in seen for o in outs)
    steps.close()
    assert not e.has_unfinished() and sorted(e._free_slots) == [0, 1, 2]
    assert e.cache.free_pages == free_pages
    # the engine serves the next call as if nothing had happened
    res = collect(e, [list(prompts()[0])], [SamplingParams(max_tokens=40)])
    assert tuple(res[0].token_ids) == greedy_ar()[0]


def test_generate_broadcasts_scalars_and_checks_lists():
    res = generate(peaked_model(), [list(p) for p in prompts()], method="ngram", max_new_tokens=[5, 6, 7],
                   max_seq_len=128)
    assert [len(r.token_ids) for r in res] == [5, 6, 7]
    with pytest.raises(ValueError, match="max_new_tokens has 2 entries for 3 prompts"):
        generate(peaked_model(), [list(p) for p in prompts()], max_new_tokens=[5, 6])
    with pytest.raises(ValueError, match="token-id lists"):
        generate(peaked_model(), "text")


def test_the_driver_takes_requests_while_it_runs_and_aborts_without_a_forward():
    e = engine(max_batch=2)
    driver = Driver(e)
    pages = e.cache.free_pages
    a = driver.add(list(prompts()[0]), SamplingParams(max_tokens=40))
    got = {a: []}
    for _ in range(3):
        for o in driver.step():
            got[o.request_id] += o.new_token_ids
    b = driver.add(list(prompts()[1]), SamplingParams(max_tokens=40))  # joins the running batch
    got[b] = []
    driver.abort(b)
    assert driver.pending == {a, b}
    while driver.pending:
        for o in driver.step():
            got[o.request_id] += o.new_token_ids
            if o.request_id == b:
                assert o.finished and o.finish_reason == "abort"
    assert tuple(got[a]) == greedy_ar()[0] and got[b] == []
    assert e.cache.free_pages == pages and not e.has_unfinished()
    c = driver.add(list(prompts()[2]), SamplingParams(max_tokens=40))
    driver.step()
    closed = driver.close()  # no forward: only the abort's own output
    assert [(o.request_id, o.finish_reason) for o in closed] == [(c, "abort")] and not driver.pending
    assert e.cache.free_pages == pages and e.num_running == e.num_waiting == 0
