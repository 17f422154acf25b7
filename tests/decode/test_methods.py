"""The method registry: every method by name builds its drafter through the engine, with the
engine's sizes; draft-token rules; a `Method` object stands in for a name."""

from __future__ import annotations

import pytest

from dspark.config import EngineConfig
from dspark.decode import Engine, generate, methods
from dspark.decode.block import BlockDrafter
from dspark.decode.drafter import Drafter
from dspark.decode.eagle3 import Eagle3Drafter
from dspark.decode.mtp import MTPDrafter
from dspark.decode.ngram import NgramDrafter
from tests.helpers.drafters import greedy_ar, oracle_method, peaked_model, prompts, tiny_dspark_draft
from tests.helpers.eagle3 import tiny_eagle3_draft


def test_registry_lists_every_method_once_with_its_needs():
    assert list(methods.METHODS) == ["ar", "mtp", "ngram", "dspark", "dflash", "dflash-l1", "dspark-v4",
                                    "eagle3"]
    # eagle3 needs a draft but is not one our recipe trains (its drafts come from DeepSpec's releases)
    assert [m for m, spec in methods.METHODS.items() if spec.needs_draft] == [*methods.draft_methods(), "eagle3"]
    assert methods.draft_methods() == ("dspark", "dflash", "dflash-l1", "dspark-v4")
    assert [m for m, spec in methods.METHODS.items() if spec.needs_mtp] == ["mtp"]
    with pytest.raises(ValueError, match="unknown method 'magic'"):
        methods.get("magic")


@pytest.mark.parametrize("method,kind,gamma", [("ar", Drafter, 0), ("mtp", MTPDrafter, 1), ("ngram", NgramDrafter, 4),
                                               ("dspark", BlockDrafter, 5), ("dflash", BlockDrafter, 5),
                                               ("eagle3", Eagle3Drafter, 4)])
def test_the_engine_builds_the_methods_drafter_with_its_sizes(method, kind, gamma):
    model = peaked_model()
    draft = None
    if method == "eagle3":
        draft = tiny_eagle3_draft(model, ttt_length=gamma)
    elif methods.get(method).needs_draft:
        draft = tiny_dspark_draft(model.config.vocab_size)
    engine = Engine(model, method, draft, EngineConfig(max_batch=3, max_seq_len=64))
    assert type(engine.drafter) is kind and engine.drafter.num_draft_tokens == gamma
    assert engine.method == method and engine.num_draft_tokens == gamma
    assert bool(engine.cache.mtp) == (method == "mtp")
    if kind is NgramDrafter:
        assert engine.drafter.history.shape == (4, 65)  # max_batch + 1 rows, max_seq_len + 1 columns


def test_draft_token_rules():
    spec, draft = methods.get("dspark"), tiny_dspark_draft(509)
    assert spec.draft_tokens(draft, None) == (5, 5)
    assert spec.draft_tokens(draft, 2) == (5, 2)  # drafts the whole block, verifies at most 2
    with pytest.raises(ValueError, match="outside the draft's block"):
        spec.draft_tokens(draft, 6)
    assert methods.get("mtp").draft_tokens(None, 3) == (3, 3)
    with pytest.raises(ValueError, match="drafts nothing"):
        methods.get("ar").draft_tokens(None, 2)
    with pytest.raises(ValueError, match="needs num_draft_tokens >= 1"):
        methods.get("ngram").draft_tokens(None, 0)


def test_a_method_object_plugs_in_a_drafter():
    truths = {p: list(p) + list(t) for p, t in zip(prompts(), greedy_ar())}
    method = oracle_method(truths, 0.0, 4)
    res = generate(peaked_model(), [list(p) for p in prompts()], method=method, max_new_tokens=12, max_seq_len=128)
    assert [tuple(r.token_ids) for r in res] == [t[:12] for t in greedy_ar()]
    assert all(sum(r.stats.accepted) > 0 for r in res)
