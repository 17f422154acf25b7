"""`dspark eval` on a smoke nano run: the table is complete, intervals behave, the teacher-forced
acceptance is exact (Monte-Carlo of the real rejection sampler, an independent argmax count), its
drafts are the engine's own, ar has τ = 1, traces have one line per round, bad run dirs are named."""

from __future__ import annotations

import json
import math
from collections import Counter

import pytest
import torch

from dspark import ops
from dspark.cli import main
from dspark.config import SamplingParams
from dspark.evaluate import (METHODS, TF_WARMUP, EvalConfig, acceptance_tf, bootstrap_ci, evaluate,
                             generate_one, heldout_files, load_run, make_engine, repeated_ngrams, survival,
                             target_rows, target_view, teacher_forced_drafter, tf_anchors)
from dspark.simulate import load_traces
from dspark.train.nano import NanoRecipe, run as run_nano

CONFIG = EvalConfig(files=2, prompt_tokens=24, max_tokens=16, tf_tokens=64)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    threads = torch.get_num_threads()
    out = tmp_path_factory.mktemp("nano")
    try:
        run_nano(NanoRecipe.smoke(), out, progress=False)
    finally:
        torch.set_num_threads(threads)
    return out


@pytest.fixture(scope="module")
def loaded(smoke):
    return load_run(smoke)


@pytest.fixture(scope="module")
def evaluated(smoke, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval")
    return evaluate(smoke, out, CONFIG, progress=False), out


def _file(run, domain="prose", tokens=64):
    return heldout_files(run, domain, 1, TF_WARMUP + 8)[0][1][:tokens]


def test_table_has_every_method_temperature_and_domain(evaluated):
    results, out = evaluated
    keys = {(r["method"], r["temperature"], r["domain"]) for r in results["rows"]}
    assert keys == {(m, t, d) for m in METHODS for t in (0.0, 1.0) for d in ("code", "prose")}
    assert len(results["rows"]) == len(keys)

    def no_nan(name):
        raise ValueError(f"{name} in eval.json")

    assert json.loads((out / "eval.json").read_text(), parse_constant=no_nan)["rows"] == json.loads(
        json.dumps(results["rows"]))
    table = (out / "table.md").read_text().splitlines()
    for m, t, d in keys:
        assert sum(line.startswith(f"| {m} | ") and f"| {t:g} | {d} |" in line for line in table) == 1
    assert (out / "tau.png").stat().st_size > 0 and (out / "acceptance.png").stat().st_size > 0


def test_bootstrap_interval_contains_the_estimate_and_repeats():
    gen = torch.Generator().manual_seed(3)
    den = torch.randint(5, 40, (12,), generator=gen).double()
    num = den * (1 + 3 * torch.rand(12, generator=gen, dtype=torch.float64))
    point = float(num.sum() / den.sum())
    lo, hi = bootstrap_ci(num, den, seed=7)
    assert lo < point < hi
    assert bootstrap_ci(num, den, seed=7) == (lo, hi)
    assert bootstrap_ci(num, den, seed=8) != (lo, hi)
    assert bootstrap_ci([6.0], [3.0], seed=0) == (2.0, 2.0)  # one file: nothing to resample


def test_every_row_interval_contains_its_estimate(evaluated):
    for row in evaluated[0]["rows"]:
        for part in ("end_to_end", "teacher_forced"):
            lo, hi = row[part]["tau_ci"]
            assert lo - 1e-12 <= row[part]["tau"] <= hi + 1e-12, (row["method"], part)


def test_teacher_forced_acceptance_matches_a_monte_carlo_of_the_rejection_sampler(loaded):
    """The exact survival Π α_j equals the rate at which the real chain rejection sampler accepts
    slots 0..i when slot i is drafted from q_i and verified against p_i (both teacher-forced)."""
    run = loaded
    view = target_view(run.target, _file(run), run.drafts["dspark"].tap_layers)
    anchors = torch.tensor([TF_WARMUP + 20])
    q_logits = teacher_forced_drafter(run, "dspark", view)(anchors)  # [A, γ, V]
    a, g, v = q_logits.shape
    p_logits = torch.cat([target_rows(view, anchors, g), torch.zeros(a, 1, v)], 1)  # + a bonus row
    exact = survival(acceptance_tf(p_logits[:, :g], q_logits, 1.0))  # [A, γ]
    assert 0.05 < float(exact[:, 0].min()) and float(exact[:, 0].max()) < 0.95  # a case with something to test

    trials, gen = 1500, torch.Generator().manual_seed(0)  # ~3 s: the reference sampler's integer exp dominates
    r = a * trials
    one, zero = torch.ones(r), torch.zeros(r, dtype=torch.long)
    q_rep = q_logits.repeat_interleave(trials, 0)  # [R, γ, V]
    drafts = ops.sample(ops.probs(q_rep.reshape(-1, v), one.repeat_interleave(g), zero.repeat_interleave(g),
                                  one.repeat_interleave(g)), torch.rand(r * g, generator=gen)).view(r, g)
    accepted, *_ = ops.chain_rejection_ref(
        p_logits.repeat_interleave(trials, 0).reshape(-1, v), torch.arange(r) * (g + 1), torch.full((r,), g), q_rep,
        drafts, one, zero, one, torch.full((r, 1), -1), torch.rand(r, g, generator=gen), torch.rand(r, generator=gen))
    slots = torch.arange(g)
    observed = (accepted.view(a, trials, 1) > slots).double().mean(1)  # [A, γ]: P(accepted > i)
    sigma = (exact * (1 - exact) / trials).sqrt().double()
    assert ((observed - exact.double()).abs() <= 4.5 * sigma + 1e-3).all(), (observed, exact)
    mean_len = accepted.view(a, trials).double().mean(1)
    assert torch.allclose(mean_len, exact.double().sum(1), atol=4.5 * g / math.sqrt(trials))


@pytest.mark.parametrize("method", ["dspark", "dflash", "mtp-k", "ngram"])
def test_greedy_teacher_forced_acceptance_is_an_argmax_match_count(loaded, evaluated, method):
    run = loaded
    g = run.gamma(method)
    taps = run.drafts[method].tap_layers if method in run.drafts else ()
    results, _ = evaluated
    max_gamma = max(run.gamma(m) for m in METHODS)
    total, count = 0.0, 0
    for domain in ("code", "prose"):
        every = dict(heldout_files(run, domain, 10**6, 1))
        for ids in (every[rel] for rel in results["files"][domain]):
            view = target_view(run.target, ids[:CONFIG.tf_tokens], taps)
            anchors = tf_anchors(len(view.ids), max_gamma)
            drafted, rows = teacher_forced_drafter(run, method, view)(anchors), target_rows(view, anchors, g)
            matches = (drafted.argmax(-1) == rows.argmax(-1)).long().cumprod(-1).sum(-1)  # leading matches
            exact = survival(acceptance_tf(rows, drafted, 0.0)).sum(-1)
            assert torch.equal(exact, matches.float())
            total, count = total + float(matches.sum()), count + len(anchors)
        row = next(r for r in results["rows"] if (r["method"], r["temperature"], r["domain"]) == (method, 0.0, domain))
        assert row["teacher_forced"]["anchors"] == count
        assert abs(row["teacher_forced"]["tau"] - (1 + total / count)) < 1e-9
        total, count = 0.0, 0


def test_teacher_forced_drafts_are_the_engines_own(loaded):
    """When the file continues with the engine's drafts, teacher forcing feeds the drafter exactly
    what it fed itself: its greedy teacher-forced block must be the engine's block, slot for slot
    (Markov heads, the MTP chain with its window, the V4 draft's context window, prompt lookup)."""
    run = loaded
    prompt = _file(run, "code", 40).tolist()
    for method in METHODS[1:]:
        engine = make_engine(run, method, 96)
        tokens, stats, _ = generate_one(engine, prompt, SamplingParams(max_tokens=12))
        transcript, pos, checked = prompt + tokens, len(prompt), 0
        taps = run.drafts[method].tap_layers if method in run.drafts else ()
        for drafted, ell, emitted in zip(stats.proposals, stats.proposal_lens, stats.emitted):
            if ell == len(drafted):
                view = target_view(run.target, torch.tensor(transcript[:pos + 1] + drafted), taps)
                tf = teacher_forced_drafter(run, method, view)(torch.tensor([pos])).argmax(-1)[0].tolist()
                assert tf == drafted, f"{method} at anchor {pos}"
                checked += 1
            pos += emitted
        assert checked >= 3, method


@pytest.mark.parametrize("method", ["dspark", "dspark-v4", "dflash"])
def test_teacher_forced_blocks_match_the_training_forward(loaded, method):
    """The inference-path blocks equal `forward_train`'s teacher-forced logits (an independent path)."""
    run = loaded
    draft = run.drafts[method]
    view = target_view(run.target, _file(run), draft.tap_layers)
    anchors = tf_anchors(len(view.ids), draft.block_size)
    features = torch.cat([view.taps[layer] for layer in draft.tap_layers], dim=-1)
    with torch.no_grad():
        want = draft.forward_train(view.ids[None], features[None], anchors[None],
                                   torch.ones(1, len(anchors), dtype=torch.bool)).draft_logits[0]
    got = teacher_forced_drafter(run, method, view)(anchors)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_ar_rows_have_tau_one(evaluated):
    for row in evaluated[0]["rows"]:
        if row["method"] == "ar":
            assert row["end_to_end"]["tau"] == 1.0 and tuple(row["end_to_end"]["tau_ci"]) == (1.0, 1.0)
            assert row["teacher_forced"]["tau"] == 1.0 and row["end_to_end"]["speed_vs_ar"] == 1.0
            assert row["end_to_end"]["rounds"] > 0 and row["end_to_end"]["prefix_survival"] == []


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
    requests = Counter((x["method"], x["temperature"], x["domain"], x["request"]) for x in lines)
    rounds = {k: sorted(x["round"] for x in lines if (x["method"], x["temperature"], x["domain"], x["request"]) == k)
              for k in requests}
    assert all(r == list(range(len(r))) for r in rounds.values())
    assert load_traces(out / "traces.jsonl", "dspark", temperature=1.0)  # the serving simulator reads them


def test_small_helpers_and_config_checks():
    assert repeated_ngrams([1, 2, 3, 4, 1, 2, 3, 4]) == (1, 5)
    assert repeated_ngrams([1, 2, 3]) == (0, 0)
    with pytest.raises(ValueError, match="unknown methods"):
        EvalConfig(methods=("ar", "eagle"))
    with pytest.raises(ValueError, match="temperatures"):
        EvalConfig(temperatures=(-1.0,))


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


def test_cli_help(capsys):
    with pytest.raises(SystemExit) as code:
        main(["eval", "--help"])
    assert code.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--run", "--out", "--files", "--prompt-tokens", "--max-tokens", "--methods", "--temperatures",
                 "--seed", "--threads"):
        assert flag in out


def test_bench_serving_compares_engine_and_simulator_on_a_smoke_run(smoke, tmp_path):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "tools" / "bench_serving.py"
    spec = importlib.util.spec_from_file_location("bench_serving", path)
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
