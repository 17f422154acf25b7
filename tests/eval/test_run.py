"""Reading a nano run: the eval methods come from the decoding registry, held-out files are chosen
deterministically, missing stages are named, and the serving benchmark reads runs the same way."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

from dspark.cli import main
from dspark.decode.methods import draft_methods
from dspark.eval import DRAFT_METHODS, METHODS, heldout_files, load_run
from dspark.eval.run import registry_method
from tests.helpers.nano_run import smoke_run

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    return smoke_run(tmp_path_factory)


def test_methods_are_the_registrys():
    assert set(DRAFT_METHODS) == set(draft_methods())
    assert METHODS == ("ar", "ngram", "mtp-1", "mtp-k", "dflash", "dflash-l1", "dspark", "dspark-v4")
    assert [registry_method(m) for m in ("ar", "ngram", "mtp-1", "mtp-k", "dspark")] == ["ar", "ngram", "mtp", "mtp",
                                                                                         "dspark"]
    with pytest.raises(ValueError, match="unknown eval method"):
        registry_method("mtp")


def test_run_gammas_and_heldout_files(smoke):
    run = load_run(smoke)
    assert run.gamma("ar") == 0 and run.gamma("mtp-1") == 1 and run.gamma("mtp-k") == run.gamma("ngram") == run.k
    assert all(run.gamma(m) == run.drafts[m].block_size for m in DRAFT_METHODS)
    files = heldout_files(run, "prose", 3, 40)
    again = heldout_files(run, "prose", 3, 40)
    assert [r for r, _ in files] == [r for r, _ in again] and all(torch.equal(x, y) for (_, x), (_, y) in zip(files, again))
    assert all(len(ids) >= 40 and ids.dtype == torch.int64 and ids[-1] == 1 for _, ids in files)
    with pytest.raises(ValueError, match="no held-out prose document has"):
        heldout_files(run, "prose", 1, 10**9)


def test_bad_run_dirs_are_named(smoke, tmp_path, capsys):
    with pytest.raises(ValueError, match="no run directory"):
        load_run(tmp_path / "absent")
    with pytest.raises(ValueError, match=r"corpus stage .*tokenizer stage .*target stage .*dspark draft"):
        load_run(tmp_path)
    partial = tmp_path / "partial"
    partial.mkdir()
    for stage in ("corpus", "tokenizer", "target"):
        (partial / stage).symlink_to(smoke / stage)
    with pytest.raises(ValueError) as err:
        load_run(partial, ("ar", "dspark"))
    assert "lacks the dspark draft (drafts/dspark/draft/config.json)" in str(err.value)
    assert "target" not in str(err.value).split("lacks")[1].split(";")[0]
    assert main(["eval", "--run", str(partial), "--no-progress"]) == 1
    assert capsys.readouterr().err.startswith(f"error: {partial} lacks the dflash draft")


def test_bench_serving_compares_engine_and_simulator_on_a_smoke_run(smoke, tmp_path):
    spec = importlib.util.spec_from_file_location("bench_serving", REPO / "tools" / "bench_serving.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    threads = torch.get_num_threads()
    try:
        assert bench.main(["--run", str(smoke), "--out", str(tmp_path), "--concurrency", "1,2", "--prompt-tokens",
                           "16", "--max-tokens", "8", "--repeats", "1"]) == 0
    finally:
        torch.set_num_threads(threads)
    res = json.loads((tmp_path / "results.json").read_text())
    points = {(r["policy"], r["concurrency"]) for r in res["measured"]}
    assert points == {(p, c) for p in bench.POLICIES for c in (1, 2)}
    for r in res["measured"]:
        assert r["per_user_tps"] > 0 and r["tau"] >= 1 and math.isfinite(r["relative_error"])
    assert {r["policy"] for r in res["simulated"]} == set(bench.POLICIES)
    table = (tmp_path / "table.md").read_text()
    assert table.count("\n| ") == 2 * len(bench.POLICIES)  # one row per measured point
    for png in ("throughput_vs_per_user.png", "budget_vs_concurrency.png"):
        assert (tmp_path / png).stat().st_size > 0
