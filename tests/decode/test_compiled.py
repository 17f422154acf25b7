"""Decode rounds compiled by inductor (C++ on CPU) emit the eager engine's tokens exactly, compile
once per round key, and fall back to eager, saying so once, where they cannot run.

Inductor compiles cost about a minute on 2 cores even for a one-layer model (24 generated kernels at
1-2 s each of codegen and g++), so every compiled case is extended: the one-layer ar case (greedy and
seeded T = 1 together), the four-layer model with every layer type, mtp, dspark and the adaptive
scheduler's two-half rounds. The default tier checks the settings and the eager fallback."""

from __future__ import annotations

import logging

import pytest
import torch

from dspark.config import EngineConfig, ModelConfig, SamplingParams
from dspark.decode import Engine, collect, compiled
from dspark.model import DeepseekV4
from tests.helpers.drafters import TOY_SPS, tiny_dspark_draft

needs_compiler = pytest.mark.skipif(compiled.cpp_compiler() is None, reason="no C++ compiler for inductor")


# The default-tier case: one CSA layer and a short Sinkhorn, a graph inductor compiles in seconds, not minutes.
SMALL = dict(num_layers=1, layer_types=("sliding",), mlp_layer_types=("hash",), hc_sinkhorn_iters=1)


def build(method: str, compile: bool | None, scheduler: str = "fixed", **model) -> Engine:
    config = ModelConfig.tiny(**model)
    model = DeepseekV4.random(config, seed=1).eval()
    draft = tiny_dspark_draft(config.vocab_size) if method == "dspark" else None
    return Engine(model, method, draft, EngineConfig(
        num_draft_tokens=2 if method == "mtp" else None, max_batch=2, max_seq_len=64, scheduler=scheduler,
        sps=TOY_SPS if scheduler != "fixed" else None, adapt=scheduler != "fixed", compile=compile))


def decode(engine: Engine) -> list[list[int]]:
    """A sampled (seeded, T = 1) and a greedy request side by side; the context stays below 64, so the
    round keys repeat and compile."""
    params = [SamplingParams(temperature=1.0, seed=3, max_tokens=14), SamplingParams(max_tokens=14)]
    return [r.token_ids for r in collect(engine, [list(range(3, 17)), [7, 8, 9]], params)]


def check_compiled_equals_eager(method: str, scheduler: str = "fixed", **model) -> None:
    engine = build(method, True, scheduler, **model)
    assert decode(engine) == decode(build(method, False, scheduler, **model))
    rounds = engine.compiled
    assert rounds.compiled_keys, "no round ran compiled: the test exercised nothing"
    # One graph per key over the run, however many rounds the key served (the callers reset Dynamo,
    # so every key compiles here; inductor's on-disk cache may serve it, which counts too).
    assert rounds.compiles == len(rounds.compiled_keys)


@pytest.mark.extended  # 55-100 s with a cold inductor cache on 2 cores, 6 s warm: over the default tier's budget
@needs_compiler
def test_compiled_ar_rounds_equal_eager_rounds():
    torch._dynamo.reset()
    check_compiled_equals_eager("ar", **SMALL)


@pytest.mark.extended
@needs_compiler
@pytest.mark.parametrize("method,scheduler", [("ar", "fixed"), ("mtp", "fixed"), ("dspark", "fixed"),
                                              ("dspark", "hardware")])
def test_compiled_rounds_equal_eager_rounds(method, scheduler):
    torch._dynamo.reset()
    check_compiled_equals_eager(method, scheduler)


@pytest.mark.extended
@needs_compiler
def test_a_second_engine_reuses_the_compiled_rounds():
    torch._dynamo.reset()
    first = build("ar", True)
    decode(first)
    assert first.compiled.compiles == len(first.compiled.compiled_keys)
    second = build("ar", True)
    decode(second)
    assert second.compiled.compiled_keys and second.compiled.compiles == 0


def test_without_a_compiler_auto_runs_eagerly_and_says_so_once(monkeypatch, caplog):
    monkeypatch.setattr(compiled, "cpp_compiler", lambda: None)
    compiled._say_eager.cache_clear()
    with caplog.at_level(logging.WARNING, logger=compiled.__name__):
        engines = [build("ar", None), build("ar", None)]
    assert all(e.compiled is None for e in engines)
    said = [r.getMessage() for r in caplog.records if "eagerly" in r.getMessage()]
    assert said == ["dspark: decode rounds run eagerly: no C++ compiler was found for inductor"]
    with pytest.raises(ValueError, match=r"compile=True, but no C\+\+ compiler"):
        build("ar", True)


def test_compile_settings_are_checked():
    with pytest.raises(ValueError, match="compile must be a bool or None"):
        EngineConfig(compile="yes")
    with pytest.raises(ValueError, match="compile=True and cuda_graphs=True"):
        EngineConfig(compile=True, cuda_graphs=True)
    assert not compiled.use_compiled_rounds(None, "cpu", "triton")
    assert not compiled.use_compiled_rounds(False, "cpu", "auto")
