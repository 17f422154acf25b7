"""What `dspark eval` writes: eval.json without NaN, one table line per row, both plots, and
traces with one line per decode round that the serving simulator reads."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from dspark.eval import markdown_table
from dspark.eval.report import json_safe
from dspark.simulate import load_traces
from tests.helpers.nano_run import smoke_eval


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    return smoke_eval(tmp_path_factory)


def test_json_table_and_plots(evaluated):
    results, out = evaluated

    def no_nan(name):
        raise ValueError(f"{name} in eval.json")

    assert json.loads((out / "eval.json").read_text(), parse_constant=no_nan)["rows"] == json.loads(
        json.dumps(results["rows"]))
    table = (out / "table.md").read_text()
    assert table == markdown_table(results) + "\n"
    lines = table.splitlines()
    for row in results["rows"]:
        m, t, d = row["method"], row["temperature"], row["domain"]
        assert sum(line.startswith(f"| {m} | ") and f"| {t:g} | {d} |" in line for line in lines) == 1
    assert (out / "tau.png").stat().st_size > 0 and (out / "acceptance.png").stat().st_size > 0


def test_json_safe_turns_nan_into_null():
    assert json_safe({"a": [float("nan"), 1.0, (2, float("nan"))], "b": "x"}) == {"a": [None, 1.0, [2, None]], "b": "x"}


def test_traces_have_one_line_per_round(evaluated):
    results, out = evaluated
    lines = [json.loads(line) for line in (out / "traces.jsonl").read_text().splitlines()]
    per_row = Counter((x["method"], x["temperature"], x["domain"]) for x in lines)
    for row in results["rows"]:
        assert per_row[row["method"], row["temperature"], row["domain"]] == row["end_to_end"]["rounds"]
    for x in lines:
        has_head = x["method"] in ("dspark", "dspark-v4")
        assert ("confidence_logits" in x) == has_head
        assert x["accepted"] <= x["proposal_len"] and x["emitted"] in (x["accepted"], x["accepted"] + 1)
        assert x["file"] == results["files"][x["domain"]][x["request"]]
    requests = Counter((x["method"], x["temperature"], x["domain"], x["request"]) for x in lines)
    rounds = {k: sorted(x["round"] for x in lines if (x["method"], x["temperature"], x["domain"], x["request"]) == k)
              for k in requests}
    assert all(r == list(range(len(r))) for r in rounds.values())
    assert load_traces(out / "traces.jsonl", "dspark", temperature=1.0)  # the serving simulator reads them
