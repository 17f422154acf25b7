"""SPS profiling and the engine's checks of scheduler configuration."""

from __future__ import annotations

import pytest

from dspark.config import ModelConfig
from dspark.decode import Engine, generate
from dspark.decode.block import DSparkDrafter
from dspark.decode.sps import cached_profile, default_buckets, profile_sps, table
from dspark.config import DraftConfig
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


def test_engine_profiles_sps_automatically(tmp_path, monkeypatch):
    monkeypatch.setenv("DSPARK_CACHE", str(tmp_path))
    model = tiny()
    drafter = DSparkDrafter(draft(), max_batch=2, max_seq_len=64)
    res = generate(model, [[1, 2, 3], [4, 5, 6, 7]], drafter=drafter, max_new_tokens=6, max_seq_len=64, max_batch=2,
                   scheduler="hardware", sps="auto")
    ar = generate(model, [[1, 2, 3], [4, 5, 6, 7]], max_new_tokens=6, max_seq_len=64)
    assert [r.token_ids for r in res] == [r.token_ids for r in ar]


def test_bad_scheduler_configuration_is_refused():
    model = tiny()
    with pytest.raises(ValueError, match="needs an SPS table"):
        Engine(model, drafter=DSparkDrafter(draft(), max_batch=2, max_seq_len=64), max_batch=2, max_seq_len=64,
               scheduler="hardware", sps=[])
    with pytest.raises(ValueError, match="positive, finite"):
        Engine(model, drafter=DSparkDrafter(draft(), max_batch=2, max_seq_len=64), max_batch=2, max_seq_len=64,
               scheduler="hardware", sps=[0.0, 1.0, -1.0])
    with pytest.raises(ValueError, match="larger than the drafter's block"):
        Engine(model, drafter=DSparkDrafter(draft(), max_batch=2, max_seq_len=64), num_draft_tokens=9,
               max_batch=2, max_seq_len=64)
    with pytest.raises(ValueError, match=r"threshold must be in \[0, 1\]"):
        Engine(model, drafter=DSparkDrafter(draft(), max_batch=2, max_seq_len=64), max_batch=2, max_seq_len=64,
               scheduler="threshold-slot", threshold=1.5)
    with pytest.raises(ValueError, match="unknown scheduler"):
        Engine(model, "ngram", scheduler="greedy")
    with pytest.raises(ValueError, match="drafts none"):
        Engine(model, "ar", scheduler="hardware", sps=[0.0, 1.0])


def test_verify_budget_below_the_block():
    """A smaller num_draft_tokens caps verification while the drafter keeps drafting its full block."""
    model = tiny()
    res = generate(model, [[1, 2, 3]], drafter=DSparkDrafter(draft(), max_batch=1, max_seq_len=64),
                   num_draft_tokens=2, max_new_tokens=10, max_seq_len=64, max_batch=1, record_proposals=True)
    assert max(res[0].stats.proposal_lens) <= 2
    assert all(len(p) == 5 for p in res[0].stats.proposals)
    assert res[0].token_ids == generate(model, [[1, 2, 3]], max_new_tokens=10, max_seq_len=64)[0].token_ids
