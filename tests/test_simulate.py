"""The serving simulator on synthetic traces and cost tables with known answers."""

from __future__ import annotations

import json

import pytest

from dspark.simulate import CostTable, Policy, TraceRound, load_traces, simulate, sweep


def cost(slope: float = 0.05) -> CostTable:
    """A verify forward costs 10 ms + slope · tokens; drafting costs 1 ms + 0.01 ms per request."""
    return CostTable(verify_ms={b: 10.0 + slope * b for b in (1, 8, 64, 512)},
                     draft_ms={"dspark": {1: 1.01, 256: 3.56}, "mtp": {1: 0.5, 256: 0.5}})


def traces(accepted: int, gamma: int = 5, conf: float = 0.8, n: int = 4) -> list[list[TraceRound]]:
    return [[TraceRound(accepted, [conf] * gamma) for _ in range(20)] for _ in range(n)]


def test_interpolation():
    c = cost()
    assert c.verify(1) == 10.05 and abs(c.verify(36) - 11.8) < 1e-9 and abs(c.verify(1024) - 61.2) < 1e-9
    assert c.verify(0) == 10.05  # flat below the first point


def test_ar_and_fixed_blocks():
    c = cost()
    ar = simulate(traces(0), c, Policy("ar", "", 0), 4, rounds=10)
    assert ar["tau"] == 1.0 and abs(ar["per_user_tps"] - 1000 / c.verify(4)) < 1e-6
    full = simulate(traces(5), c, Policy("dspark-fixed", "dspark", 5), 4, rounds=10)
    assert full["tau"] == 6.0 and full["verify_budget"] == 6.0
    partial = simulate(traces(2), c, Policy("mtp-1", "mtp", 5, max_verify=1), 4, rounds=10)
    assert partial["tau"] == 2.0 and partial["verify_budget"] == 2.0


def test_hardware_scheduler_shrinks_the_budget_under_load():
    c = cost(slope=0.5)
    p = Policy("dspark-hardware", "dspark", 5, scheduler="hardware")
    light = simulate(traces(3, conf=0.7), c, p, 1, rounds=20)
    heavy = simulate(traces(3, conf=0.7), c, p, 64, rounds=20)
    assert heavy["verify_budget"] < light["verify_budget"]
    rows = sweep({"dspark": traces(3, conf=0.7)}, c, [p, Policy("fixed", "dspark", 5)], [1, 8], rounds=5)
    assert [r["policy"] for r in rows] == ["dspark-hardware"] * 2 + ["fixed"] * 2


def test_trace_file_and_errors(tmp_path):
    path = tmp_path / "traces.jsonl"
    lines = [dict(method="dspark", temperature=1.0, domain="code", request=r, proposal_len=5, accepted=a,
                  confidence_logits=[0.0] * 5) for r in range(2) for a in (1, 4)]
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    got = load_traces(path, "dspark", 1.0)
    assert [[t.accepted for t in tr] for tr in got] == [[1, 4], [1, 4]] and got[0][0].confidence == [0.5] * 5
    with pytest.raises(ValueError, match="no trace rounds"):
        load_traces(path, "mtp")
    with pytest.raises(ValueError, match="needs traces with confidences"):
        simulate([[TraceRound(1)]], cost(), Policy("h", "dspark", 5, scheduler="hardware"), 2)
    c = cost()
    c.save(tmp_path / "cost.json")
    assert CostTable.load(tmp_path / "cost.json").verify(8) == c.verify(8)
