"""`torch.compile(fullgraph=True)` over the reference path on CPU: the dense forward, the engine's
ragged forward and whole decode rounds trace without a graph break and give the eager results
exactly. The `aot_eager` backend traces through AOTAutograd like inductor but runs the captured graph
eagerly, so these tests need no C++ compiler; generated kernels are checked on the GPU."""

from __future__ import annotations

import pytest
import torch

import dspark.decode.engine as engine_module
from dspark.config import EngineConfig, ModelConfig, SamplingParams
from dspark.decode import Engine, collect
from dspark.model import DeepseekV4
from dspark.model.batch import Batch
from dspark.model.cache import TargetCache
from tests.helpers.drafters import dspark_target as drafter_target, make_draft


def compiled(fn):
    torch._dynamo.reset()  # each test traces afresh, not from another test's cache
    return torch.compile(fn, fullgraph=True, backend="aot_eager")


@pytest.fixture(scope="module")
def tiny():
    return DeepseekV4.random(ModelConfig.tiny(), seed=0).eval()


def test_dense_forward_compiles_without_graph_breaks(tiny):
    ids = torch.randint(0, tiny.config.vocab_size, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(compiled(tiny)(ids), tiny(ids))


def test_engine_forward_compiles_without_graph_breaks(tiny):
    """A verify chunk (two requests, padding) after a prefill that crosses compression windows."""
    cfg = tiny.config
    g = torch.Generator().manual_seed(1)

    def prefilled():
        cache = TargetCache(cfg, max_batch=2, max_seq_len=64, max_provisional=8, dtype=torch.float32)
        for slot in range(2):
            cache.admit(slot, 64)
        tiny.forward_batch(prefill, cache)
        return cache

    prefill = Batch.build([(0, 0, torch.randint(0, cfg.vocab_size, (20,), generator=g).tolist()),
                           (1, 0, torch.randint(0, cfg.vocab_size, (17,), generator=g).tolist())], dummy_slot=2)
    verify = Batch.build([(0, 20, [5, 6, 7]), (1, 17, [8, 9])], dummy_slot=2, pad_to=8, logits="all")
    with torch.no_grad():
        want = tiny.forward_batch(verify, prefilled())
        got = compiled(tiny.forward_batch)(verify, prefilled())
    assert torch.equal(got.logits, want.logits) and torch.equal(got.streams, want.streams)


def decode(model, method, draft, compile_rounds: bool):
    original = engine_module.decode_round
    if compile_rounds:
        engine_module.decode_round = compiled(original)
    try:
        engine = Engine(model, method, draft, EngineConfig(
            num_draft_tokens=None if draft is not None or method == "ar" else 2, max_batch=2, max_seq_len=96))
        results = collect(engine, [list(range(3, 17)), [7, 8, 9]],
                          [SamplingParams(temperature=1.0, seed=3, max_tokens=12), SamplingParams(max_tokens=12)])
        return [r.token_ids for r in results]
    finally:
        engine_module.decode_round = original


@pytest.mark.extended
@pytest.mark.parametrize("method", ["ar", "mtp", "ngram", "dspark"])
def test_decode_rounds_compile_without_graph_breaks(tiny, method):
    """Whole draft → verify → accept rounds (several buckets, so several traces) equal eager decoding."""
    if method == "dspark":
        model = drafter_target()
        eager = decode(model, "dspark", make_draft("gated"), False)
        assert decode(model, "dspark", make_draft("gated"), True) == eager
    else:
        assert decode(tiny, method, None, True) == decode(tiny, method, None, False)
