"""The measurements' arithmetic: the teacher-forced acceptance is exact (a Monte-Carlo of the real
rejection sampler on a trained draft; an argmax-match count at T = 0), the file bootstrap, anchors,
ratios, the repetition count."""

from __future__ import annotations

import math

import pytest
import torch

from dspark import ops
from dspark.decode.drafter import target_view
from dspark.decode.stats import RequestStats
from dspark.eval import (TF_WARMUP, acceptance_tf, bootstrap_ci, heldout_files, load_run, make_engine,
                         repeated_ngrams, survival, target_rows, tf_anchors)
from dspark.eval.stats import conditional, ratio, reaching
from tests.helpers.nano_run import smoke_run


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    return load_run(smoke_run(tmp_path_factory))


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
    assert all(math.isnan(x) for x in bootstrap_ci([], [], seed=0) + bootstrap_ci([0.0], [0.0], seed=0))


def test_greedy_acceptance_counts_leading_argmax_matches():
    gen = torch.Generator().manual_seed(1)
    target = torch.randn(50, 6, 5, generator=gen)
    draft = torch.where(torch.rand(50, 6, 1, generator=gen) < 0.7, target, torch.randn(50, 6, 5, generator=gen))
    matches = (draft.argmax(-1) == target.argmax(-1)).long().cumprod(-1).sum(-1)
    assert torch.equal(survival(acceptance_tf(target, draft, 0.0)).sum(-1), matches.float())
    alpha = acceptance_tf(target, draft, 1.0)
    assert ((alpha > 0) & (alpha <= 1 + 1e-6)).all()
    assert torch.allclose(acceptance_tf(target, target, 0.7), torch.ones(50, 6))


def test_teacher_forced_acceptance_matches_a_monte_carlo_of_the_rejection_sampler(loaded):
    """The exact survival Π α_j equals the rate at which the real chain rejection sampler accepts
    slots 0..i when slot i is drafted from q_i and verified against p_i (both teacher-forced)."""
    run = loaded
    ids = heldout_files(run, "prose", 1, TF_WARMUP + 8)[0][1][:64]
    drafter = make_engine(run, "dspark", 96).drafter
    view = target_view(run.target, ids, drafter.tap_layers)
    anchors = torch.tensor([TF_WARMUP + 20])
    q_logits = drafter.teacher_forced(view)(anchors)  # [A, γ, V]
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


def test_anchors_rows_ratios_and_conditionals():
    assert tf_anchors(30, 5).tolist() == list(range(TF_WARMUP, 25))
    assert len(tf_anchors(TF_WARMUP + 3, 5)) == 0  # too short: no anchor

    class View:
        logits = torch.arange(40.0).view(10, 4)

    assert torch.equal(target_rows(View, torch.tensor([2, 5]), 3), View.logits[torch.tensor([[2, 3, 4], [5, 6, 7]])])
    assert ratio([3, 3], [2, 4]) == 1.0 and math.isnan(ratio([1], [0]))
    assert conditional([0.5, 0.25, 0.0, 0.0]) == [0.5, 0.5, 0.0, None]
    stats = RequestStats()
    stats.proposal_lens, stats.accepted = [3, 3, 2, 0], [0, 2, 2, 0]
    assert reaching(stats) == [3, 2, 1]  # slot i: rounds with ℓ > i and accepted ≥ i


def test_repeated_ngrams():
    assert repeated_ngrams([1, 2, 3, 4, 1, 2, 3, 4]) == (1, 5)
    assert repeated_ngrams([1, 2, 3]) == (0, 0)
    assert repeated_ngrams([7] * 6, n=2) == (4, 5)
