"""Decode rounds keep their state in place: every tensor the engine carries from one round to the next
(slot state, target and MTP caches, drafter contexts, the adaptation tracker) is the same storage
before and after a round. A CUDA graph replays the addresses it captured, so state that a round
rebinds to a fresh tensor would be read stale on the next replay (CPU-testable half of graph safety)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dspark.config import EngineConfig, ModelConfig, SamplingParams
from dspark.decode import Engine
from dspark.model.target import DeepseekV4
from tests.helpers.drafters import TOY_SPS, tiny_dspark_draft


def state_tensors(obj, path="", seen=None) -> dict[str, torch.Tensor]:
    """Every tensor reachable from `obj` through attributes, lists, tuples and dicts (models skipped:
    their weights never change at inference)."""
    seen = set() if seen is None else seen
    if id(obj) in seen or isinstance(obj, nn.Module):
        return {}
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        return {path: obj}
    items = ()
    if isinstance(obj, dict):
        items = obj.items()
    elif isinstance(obj, (list, tuple)):
        items = enumerate(obj)
    elif hasattr(obj, "__dict__") and type(obj).__module__.startswith("dspark"):
        items = vars(obj).items()
    out = {}
    for key, value in items:
        out.update(state_tensors(value, f"{path}.{key}", seen))
    return out


def engine_state(engine) -> dict[str, int]:
    found = {}
    for name in ("slots", "cache", "drafter", "scheduler", "tracker"):
        found.update({k: t.data_ptr() for k, t in state_tensors(getattr(engine, name), name).items()})
    return found


@pytest.mark.parametrize("method", ["ar", "mtp", "ngram", "dspark"])
def test_rounds_update_state_in_place(method):
    config = ModelConfig.tiny()
    model = DeepseekV4.random(config, seed=1).eval()
    draft, extra = None, {}
    if method == "dspark":  # with the hardware scheduler and online adaptation, so the tracker runs too
        draft = tiny_dspark_draft(config.vocab_size)
        extra = dict(scheduler="hardware", sps=TOY_SPS, adapt=True)
    engine = Engine(model, method, draft, EngineConfig(
        num_draft_tokens=2 if method in ("mtp", "ngram") else None, max_batch=4, max_seq_len=96, token_bucket=4,
        **extra))
    for i, prompt in enumerate(([5, 6, 7], list(range(10, 40)))):
        engine.add_request(prompt, SamplingParams(temperature=1.0, top_p=0.9, seed=i, max_tokens=12))
    engine.prefill_all()
    engine.step()  # one decode round: lazily allocated state (e.g. draft context rings) exists after it
    rounds = 0
    while engine.has_unfinished():
        before = engine_state(engine)
        engine.step()
        after = engine_state(engine)
        moved = sorted(k for k in before if k in after and after[k] != before[k])
        assert not moved, f"{method}: a round rebinds carried state {moved}"
        assert set(after) == set(before), f"{method}: state appeared or vanished: {set(after) ^ set(before)}"
        rounds += 1
    assert rounds >= 2
