"""Graph-replayed decode rounds give the eager engine's tokens exactly.

On CPU `CapturedRounds(emulate=True)` replays each key's stored closure, so any round input that
bypasses the static buffers is read stale; a test shows the check has teeth by breaking the copy.
On a GPU the same runs use real CUDA graphs."""

from __future__ import annotations

import pytest
import torch

from dspark.config import EngineConfig, ModelConfig, SamplingParams
from dspark.decode import Engine
from dspark.decode.graphs import CapturedRounds
from dspark.decode.step import RoundPlan
from dspark.model.target import DeepseekV4
from tests.helpers.drafters import TOY_SPS, tiny_dspark_draft

SETUPS = {  # name → (method, scheduler, adapt)
    "ar": ("ar", "fixed", False), "mtp": ("mtp", "fixed", False), "ngram": ("ngram", "fixed", False),
    "dspark": ("dspark", "fixed", False), "dspark-hardware": ("dspark", "hardware", True),
    "dspark-async": ("dspark", "async", False),
}


def build(name: str, device="cpu", dtype=torch.float32, graphs: str | None = None) -> Engine:
    method, scheduler, adapt = SETUPS[name]
    config = ModelConfig.tiny()
    model = DeepseekV4.random(config, seed=1, dtype=dtype, device=device).eval()
    draft = tiny_dspark_draft(config.vocab_size).to(device=device, dtype=dtype) if method == "dspark" else None
    engine = Engine(model, method, draft, EngineConfig(
        num_draft_tokens=2 if method in ("mtp", "ngram") else None, max_batch=3, max_seq_len=96, scheduler=scheduler,
        sps=TOY_SPS if scheduler != "fixed" else None, adapt=adapt, cuda_graphs=graphs == "cuda"))
    if graphs == "emulate":
        engine.graphs = CapturedRounds(3, device, emulate=True)
    return engine


def decode(engine: Engine) -> dict[int, list[int]]:
    """Three requests joining at different times, greedy and sampled, one with top-k (a new graph key)."""
    params = [SamplingParams(temperature=1.0, seed=3, max_tokens=40),
              SamplingParams(temperature=0.0, max_tokens=30),
              SamplingParams(temperature=0.9, top_k=20, seed=5, max_tokens=36)]
    prompts = [list(range(3, 17)), [7, 8, 9], list(range(40, 61))]
    out: dict[int, list[int]] = {}
    pending = list(zip(prompts, params))
    steps = 0
    while pending or engine.has_unfinished():
        if pending and steps % 3 == 0:
            rid = engine.add_request(*pending.pop(0))
            out[rid] = []
        for o in engine.step():
            out[o.request_id] += o.new_token_ids
        steps += 1
    return out


@pytest.mark.parametrize("name", list(SETUPS))
def test_replayed_rounds_equal_eager_rounds(name):
    engine = build(name, graphs="emulate")
    assert decode(engine) == decode(build(name))
    assert engine.graphs.replays >= 3, "no round came from a graph: the test exercised nothing"


def test_the_emulation_catches_inputs_that_bypass_the_static_buffers(monkeypatch):
    """If the host handed a round fresh tensors instead of copying into the static ones, replays would
    read the capture-time values: the tokens (or the run) must then differ from eager decoding."""
    def plan_without_copy(self, committed, room, bucket, scheduler, tracker):
        return RoundPlan(committed=committed.clone(), room=room.clone(), bucket=bucket, scheduler=scheduler,
                         tracker=tracker)

    monkeypatch.setattr(CapturedRounds, "plan", plan_without_copy)
    engine = build("mtp", graphs="emulate")
    try:
        broken = decode(engine)
    except Exception:  # stale positions can also break the run outright
        return
    assert broken != decode(build("mtp"))


def test_cuda_graphs_need_a_cuda_device():
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    with pytest.raises(ValueError, match="CUDA graphs need a CUDA device"):
        build("ar", graphs="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("name", list(SETUPS))
def test_cuda_graph_rounds_equal_eager_rounds_on_the_gpu(name):
    engine = build(name, device="cuda", graphs="cuda")
    assert decode(engine) == decode(build(name, device="cuda"))
    assert engine.graphs.replays >= 3
