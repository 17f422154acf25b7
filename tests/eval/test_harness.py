"""`dspark eval` on a smoke nano run: the table is complete, intervals hold their estimates, the
teacher-forced τ is the mean of the engine drafters' own argmax-match counts at T = 0, ar has τ = 1,
configurations are checked, the CLI parses."""

from __future__ import annotations

import pytest
import torch

from dspark.cli import main
from dspark.decode.drafter import target_view
from dspark.eval import (METHODS, EvalConfig, acceptance_tf, evaluate, heldout_files, load_run, make_engine,
                         survival, target_rows, tf_anchors)
from tests.helpers.nano_run import EVAL_CONFIG, smoke_eval, smoke_run


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    return smoke_eval(tmp_path_factory)


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    return load_run(smoke_run(tmp_path_factory))


def test_table_has_every_method_temperature_and_domain(evaluated):
    results, _ = evaluated
    keys = [(r["method"], r["temperature"], r["domain"]) for r in results["rows"]]
    assert sorted(keys) == sorted((m, t, d) for m in METHODS for t in (0.0, 1.0) for d in ("code", "prose"))
    assert all(1 <= len(files) <= EVAL_CONFIG.files for files in results["files"].values())
    assert tuple(results["config"]["methods"]) == METHODS


def test_every_row_interval_contains_its_estimate(evaluated):
    for row in evaluated[0]["rows"]:
        for part in ("end_to_end", "teacher_forced"):
            lo, hi = row[part]["tau_ci"]
            assert lo - 1e-12 <= row[part]["tau"] <= hi + 1e-12, (row["method"], part)


@pytest.mark.parametrize("method", ["dspark", "dflash", "mtp-k", "ngram"])
def test_greedy_teacher_forced_tau_is_a_mean_argmax_match_count(loaded, evaluated, method):
    run = loaded
    g = run.gamma(method)
    drafter = make_engine(run, method, 96).drafter
    results, _ = evaluated
    max_gamma = max(run.gamma(m) for m in METHODS)
    for domain in ("code", "prose"):
        total, count = 0.0, 0
        every = dict(heldout_files(run, domain, 10**6, 1))
        for ids in (every[rel] for rel in results["files"][domain]):
            view = target_view(run.target, ids[:EVAL_CONFIG.tf_tokens], drafter.tap_layers)
            anchors = tf_anchors(len(view.ids), max_gamma)
            drafted, rows = drafter.teacher_forced(view)(anchors), target_rows(view, anchors, g)
            matches = (drafted.argmax(-1) == rows.argmax(-1)).long().cumprod(-1).sum(-1)  # leading matches
            assert torch.equal(survival(acceptance_tf(rows, drafted, 0.0)).sum(-1), matches.float())
            total, count = total + float(matches.sum()), count + len(anchors)
        row = next(r for r in results["rows"] if (r["method"], r["temperature"], r["domain"]) == (method, 0.0, domain))
        assert row["teacher_forced"]["anchors"] == count
        assert abs(row["teacher_forced"]["tau"] - (1 + total / count)) < 1e-9


def test_ar_rows_have_tau_one(evaluated):
    for row in evaluated[0]["rows"]:
        if row["method"] == "ar":
            assert row["end_to_end"]["tau"] == 1.0 and tuple(row["end_to_end"]["tau_ci"]) == (1.0, 1.0)
            assert row["teacher_forced"]["tau"] == 1.0 and row["end_to_end"]["speed_vs_ar"] == 1.0
            assert row["end_to_end"]["rounds"] > 0 and row["end_to_end"]["prefix_survival"] == []


def test_engines_draft_what_the_method_says(loaded):
    run = loaded
    for method in METHODS:
        engine = make_engine(run, method, 96)
        assert engine.drafter.num_draft_tokens == run.gamma(method), method
        assert engine.config.scheduler == "fixed" and engine.config.record_proposals and engine.max_batch == 1


def test_config_checks(loaded, tmp_path):
    with pytest.raises(ValueError, match="unknown methods"):
        EvalConfig(methods=("ar", "eagle"))
    with pytest.raises(ValueError, match="methods repeat"):
        EvalConfig(methods=("ar", "ar"))
    with pytest.raises(ValueError, match="temperatures"):
        EvalConfig(temperatures=(-1.0,))
    with pytest.raises(ValueError, match="files must be >= 1"):
        EvalConfig(files=0)
    with pytest.raises(ValueError, match="leaves no anchor"):
        evaluate(loaded.path, tmp_path, EvalConfig(methods=("ar",), tf_tokens=8), progress=False)
    with pytest.raises(ValueError, match="exceed the target's"):
        evaluate(loaded.path, tmp_path, EvalConfig(methods=("ar",), prompt_tokens=10**6), progress=False)


def test_cli_help(capsys):
    with pytest.raises(SystemExit) as code:
        main(["eval", "--help"])
    assert code.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--run", "--out", "--files", "--prompt-tokens", "--max-tokens", "--methods", "--temperatures",
                 "--seed", "--threads"):
        assert flag in out
