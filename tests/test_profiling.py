"""`dspark profile`: a Chrome trace, a per-op table and a summary whose numbers add up, for the
embedded nano model with its DSpark draft and for a random preset with its MTP; clear errors."""

from __future__ import annotations

import json

import pytest

from dspark.cli import main
from dspark.profiling import ProfileConfig, profile


@pytest.mark.parametrize("model,method", [("nano", "dspark"), ("tiny", "mtp")])
def test_profile_writes_trace_table_and_summary(tmp_path, model, method):
    config = ProfileConfig(model=model, method=method, concurrency=2, rounds=2, warmup=1)
    summary = profile(config, tmp_path, progress=False)
    trace = json.loads((tmp_path / "trace.json").read_text())
    rounds = [e for e in trace["traceEvents"] if e.get("name") == "dspark.round"]
    assert len(rounds) == 2
    table = (tmp_path / "kernels.md").read_text().splitlines()
    assert table[0].startswith("| op") and len([row for row in table if row.startswith("| `aten::")]) >= 5
    assert json.loads((tmp_path / "summary.json").read_text()) == json.loads(json.dumps(summary))
    assert len(summary["round_ms"]) == 2 and all(ms > 0 for ms in summary["round_ms"])
    assert summary["idle_us_per_round"] >= 0 and summary["busy_us_per_round"] > 0
    assert 0 <= summary["idle_share"] < 1
    assert all(g["us"] > 0 and g["after"] and g["before"] for g in summary["largest_gaps"])
    assert summary["config"]["method"] == method


def test_profile_command_line(tmp_path, capsys):
    assert main(["profile", "--model", "tiny", "--method", "ar", "--concurrency", "1", "--rounds", "1",
                 "--warmup", "0", "--quiet", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "| op (self CPU time) |" in out and "1 rounds of ar" in out
    with pytest.raises(SystemExit):
        main(["profile", "--help"])
    assert "nsys profile" in capsys.readouterr().out


@pytest.mark.parametrize("args,message", [(["--rounds", "0"], "rounds must be >= 1"),
                                          (["--concurrency", "0"], "concurrency must be >= 1"),
                                          (["--nsys"], "--nsys needs CUDA"),
                                          (["--cuda-graphs"], "--cuda-graphs needs CUDA")])
def test_bad_settings_fail_clearly(tmp_path, capsys, args, message):
    rc = main(["profile", "--model", "tiny", "--method", "ar", "--out", str(tmp_path), *args])
    assert rc != 0 and message in capsys.readouterr().err
