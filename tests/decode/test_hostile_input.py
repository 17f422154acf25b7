"""Hostile values at the API boundary: every field of SamplingParams, add_request and EngineConfig
either raises ValueError / TypeError naming the field at the call, or the request runs; either way
the engine's free slots, free pages and the tokens of the request already running are what they
would have been without the bad call."""

from __future__ import annotations

import dataclasses
import functools

import pytest
import torch
from hypothesis import given, strategies as st

from dspark.config import EngineConfig, SamplingParams
from dspark.decode import Engine
from tests.helpers.drafters import peaked_model, prompts

# Wrong types, NaN, ±inf, 0, negatives, 2^63 and beyond, huge strings, containers.
HOSTILE = st.one_of(
    st.none(), st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([0, -1, 2**31, 2**63 - 1, 2**63, 2**64, 10**30]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([float("nan"), float("inf"), -float("inf"), -0.0, 1e-320, 3.5e38]),
    st.text(max_size=8), st.just("x" * 100_000),
    st.lists(st.integers(min_value=-3, max_value=10**6), max_size=3),
    st.lists(st.floats(allow_nan=True), max_size=2),
)
SAMPLING_FIELDS = [f.name for f in dataclasses.fields(SamplingParams)]
ENGINE_FIELDS = [f.name for f in dataclasses.fields(EngineConfig)]


@functools.lru_cache(maxsize=None)
def running_alone() -> tuple[int, ...]:
    """The tokens of the request that is running when the hostile call comes."""
    return tuple(decode_with(None))


def decode_with(hostile) -> list[int]:
    """Run the victim request, make `hostile(engine)` after two steps, finish; check the engine's state."""
    engine = Engine(peaked_model(), "ngram", config=EngineConfig(max_batch=2, max_seq_len=128))
    slots, pages = sorted(engine._free_slots), engine.cache.free_pages
    victim = engine.add_request(list(prompts()[1]), SamplingParams(temperature=1.0, seed=7, max_tokens=20))
    tokens = []
    for step in range(200):
        if step == 2 and hostile is not None:
            hostile(engine)
        for out in engine.step():
            if out.request_id == victim:
                tokens += out.new_token_ids
        if not engine.has_unfinished():
            break
    assert not engine.has_unfinished(), "the engine hangs"
    assert sorted(engine._free_slots) == slots and engine.cache.free_pages == pages, "a slot or pages leaked"
    return tokens


def refused_naming(error: Exception, field: str) -> bool:
    return isinstance(error, (ValueError, TypeError)) and field in str(error)


@given(field=st.sampled_from(SAMPLING_FIELDS), value=HOSTILE)
def test_sampling_params_refuse_by_name_or_run_without_disturbing(field, value):
    try:
        params = SamplingParams(**{field: value, "max_tokens": 6} if field != "max_tokens" else {field: value})
    except Exception as e:
        assert refused_naming(e, field), f"{field}={value!r}: {type(e).__name__}: {e}"
        return
    if params.max_tokens > 100:  # a huge but valid budget: the request would not fit this engine
        params = dataclasses.replace(params, max_tokens=6)

    def hostile(engine):
        try:
            engine.add_request([3, 4, 5], params)
        except Exception as e:
            assert refused_naming(e, "stop token"), f"{field}={value!r}: {type(e).__name__}: {e}"

    assert tuple(decode_with(hostile)) == running_alone()


@given(prompt=st.one_of(HOSTILE, st.lists(HOSTILE, max_size=3), st.just(torch.ones(2, 2, dtype=torch.long)),
                        st.just(torch.tensor([1.5, 2.0]))))
def test_add_request_refuses_bad_prompts_without_disturbing(prompt):
    def hostile(engine):
        try:
            engine.add_request(prompt, SamplingParams(max_tokens=4))
        except (ValueError, TypeError) as e:
            assert "prompt" in str(e) or "vocabulary" in str(e), str(e)

    assert tuple(decode_with(hostile)) == running_alone()


@given(field=st.sampled_from(ENGINE_FIELDS), value=HOSTILE)
def test_engine_config_refuses_by_name(field, value):
    try:
        config = EngineConfig(**{field: value})
    except Exception as e:
        assert refused_naming(e, field), f"{field}={value!r}: {type(e).__name__}: {e}"
        return
    # Accepted values build an engine or are refused by it with a ValueError, never anything else.
    try:
        Engine(peaked_model(), "ngram", config=config.replace(max_seq_len=min(config.max_seq_len or 128, 512)))
    except ValueError:
        pass


@pytest.mark.parametrize("bad", [dict(max_batch=2**31), dict(token_bucket=10**6), dict(max_stop_tokens=10**6),
                                 dict(max_seq_len=0), dict(max_seq_len=-5), dict(page_size=0),
                                 dict(num_draft_tokens=-1), dict(max_batch=2.0), dict(adapt="yes")])
def test_engine_config_bounds(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        EngineConfig(**bad)


def test_a_huge_memory_budget_allocates_only_what_the_slots_can_use():
    engine = Engine(peaked_model(), "ngram", config=EngineConfig(max_batch=2, max_seq_len=128, memory_budget=10**18))
    assert engine.cache.num_pages - 1 == 2 * engine.cache.pages_per_slot
