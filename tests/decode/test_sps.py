"""SPS profiling and the engine's checks of scheduler configuration."""

from __future__ import annotations

import pytest

from dspark.config import DraftConfig, EngineConfig, ModelConfig
from dspark.decode import Engine, generate
from dspark.decode.sps import cached_profile, default_buckets, engine_sps, profile_sps, table
from dspark.draft.deepspec import DraftModel
from dspark.model.target import DeepseekV4


def tiny():
    return DeepseekV4.random(ModelConfig.tiny(), seed=0).eval()


def draft():
    cfg = DraftConfig.tiny(vocab_size=509, mask_token_id=500, target_layer_ids=(1, 2), target_hidden_size=56)
    return DraftModel.random(cfg, seed=1).eval()


def test_buckets_and_table():
    assert default_buckets(20) == [1, 2, 3, 4, 6, 8, 12, 16, 20]
    t = table({1: 100.0, 5: 50.0}, 7)  # step time 10 ms → 20 ms, linear in between, flat past 5
    assert t[0] == 0.0 and t[1] == 100.0 and abs(1 / t[3] - 0.015) < 1e-12 and t[7] == 50.0


def test_profile_and_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DSPARK_CACHE", str(tmp_path))
    model = tiny()
    prof = profile_sps(model, [1, 3, 8], requests=3, context=20, repeats=1)
    assert sorted(prof) == [1, 3, 8] and all(v > 0 for v in prof.values())
    first = cached_profile(model, [1, 3], requests=2, context=16, repeats=1)
    assert cached_profile(model, [1, 3], requests=2, context=16) == first  # read back, not re-measured
    assert len(list(tmp_path.glob("sps-*.json"))) == 1


def test_engine_sps_profiles_what_the_hardware_scheduler_needs(tmp_path, monkeypatch):
    """The caller profiles (cached) and passes the table in; the engine never profiles."""
    monkeypatch.setenv("DSPARK_CACHE", str(tmp_path))
    model, d = tiny(), draft()
    sps = engine_sps(model, 2, d.block_size)
    assert len(sps) == 2 * (d.block_size + 1) + 1 and sps[0] == 0 and min(sps[1:]) > 0
    res = generate(model, [[1, 2, 3], [4, 5, 6, 7]], method="dspark", draft=d, max_new_tokens=6, max_seq_len=64,
                   max_batch=2, scheduler="hardware", sps=sps)
    ar = generate(model, [[1, 2, 3], [4, 5, 6, 7]], max_new_tokens=6, max_seq_len=64)
    assert [r.token_ids for r in res] == [r.token_ids for r in ar]


def test_bad_scheduler_configuration_is_refused():
    model = tiny()
    with pytest.raises(ValueError, match="needs an SPS table"):
        Engine(model, "dspark", draft(), EngineConfig(max_batch=2, max_seq_len=64, scheduler="hardware", sps=[]))
    with pytest.raises(ValueError, match="positive, finite"):
        Engine(model, "dspark", draft(), EngineConfig(max_batch=2, max_seq_len=64, scheduler="hardware",
                                                      sps=[0.0, 1.0, -1.0]))
    with pytest.raises(ValueError, match="outside the draft's block"):
        Engine(model, "dspark", draft(), EngineConfig(num_draft_tokens=9, max_batch=2, max_seq_len=64))
    with pytest.raises(ValueError, match=r"threshold must be in \[0, 1\]"):
        Engine(model, "dspark", draft(), EngineConfig(max_batch=2, max_seq_len=64, scheduler="threshold-slot",
                                                      threshold=1.5))
    with pytest.raises(ValueError, match="unknown scheduler"):
        Engine(model, "ngram", config=EngineConfig(scheduler="greedy"))
    with pytest.raises(ValueError, match="drafts none"):
        Engine(model, "ar", config=EngineConfig(scheduler="hardware", sps=[0.0, 1.0]))
    with pytest.raises(ValueError, match="needs a drafter with confidences"):
        Engine(model, "mtp", config=EngineConfig(scheduler="hardware", sps=[0.0, 1.0]))
    with pytest.raises(ValueError, match="needs a trained draft"):
        Engine(model, "dspark")
    with pytest.raises(ValueError, match="takes no draft"):
        Engine(model, "ngram", draft())


def test_verify_budget_below_the_block():
    """A smaller num_draft_tokens caps verification while the drafter keeps drafting its full block."""
    model = tiny()
    res = generate(model, [[1, 2, 3]], method="dspark", draft=draft(), num_draft_tokens=2, max_new_tokens=10, max_seq_len=64, max_batch=1, record_proposals=True)
    assert max(res[0].stats.proposal_lens) <= 2
    assert all(len(p) == 5 for p in res[0].stats.proposals)
    assert res[0].token_ids == generate(model, [[1, 2, 3]], max_new_tokens=10, max_seq_len=64)[0].token_ids
