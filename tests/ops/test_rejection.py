"""Chain rejection sampling, checked exactly with stratified uniform grids.

For a fixed draft token x, the op is a deterministic function of (accept_u, sample_u), and the two
act independently: accept_u decides acceptance, sample_u picks the residual / bonus token. So the
induced output distribution is P_acc(x)·δ_x + (1 − P_acc(x))·residual(x), where P_acc comes from a
midpoint grid over accept_u and the residual histogram from a midpoint grid over sample_u with
accept_u just below 1 (rejecting whenever acceptance is not certain). Weighting by the draft's
probability q(x) gives the distribution to compare with the target, exact to grid resolution 1/N.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings, strategies as st

from dspark.ops.rejection import chain_rejection_ref
from dspark.ops.sampling import probs_ref
from tests.compare import assert_close
from tests.strategies import probability_rows

V = 6


def run(target_rows, draft_rows, drafts, verify_len, accept_u, sample_u, temperature=1.0, top_k=0, top_p=1.0,
        stop=()):
    """One request's rows replicated over len(sample_u) requests."""
    r = sample_u.shape[0]
    gamma = draft_rows.shape[0]
    rows = target_rows.shape[0]
    start = torch.arange(r) * rows
    stop_tokens = torch.tensor([list(stop) or [-1]]).expand(r, -1)
    return chain_rejection_ref(
        target_rows.repeat(r, 1), start, torch.full((r,), verify_len), draft_rows.expand(r, gamma, V),
        drafts.expand(r, gamma), torch.full((r,), temperature), torch.full((r,), top_k), torch.full((r,), top_p),
        stop_tokens, accept_u, sample_u)


def grid(n: int) -> torch.Tensor:
    return (torch.arange(n, dtype=torch.float64) + 0.5).div(n).float()


ALMOST_ONE = 1.0 - 2.0 ** -24


def first_token_distribution(p_rows, q_row, n, **params):
    """Induced distribution of the first emitted token with γ = 1 (drafts weighted by q)."""
    q = target(q_row, **params)
    u = grid(n)
    dist = torch.zeros(V, dtype=torch.float64)
    for x in range(V):
        if q[x] == 0:
            continue
        draft = torch.tensor([[x]])
        acc, emitted, _, _ = run(p_rows, q_row[None], draft, 1, u[:, None], torch.full((n,), 0.5), **params)
        assert (emitted[acc == 1, 0] == x).all()
        p_acc = float((acc == 1).double().mean())
        dist[x] += q[x] * p_acc
        if p_acc < 1:
            acc, emitted, _, _ = run(p_rows, q_row[None], draft, 1, torch.full((n, 1), ALMOST_ONE), u, **params)
            assert (acc == 0).all()
            dist += q[x] * (1 - p_acc) * torch.bincount(emitted[:, 0], minlength=V).double() / n
    return dist


def target(p_row, **params):
    return probs_ref(p_row[None], torch.tensor([params.get("temperature", 1.0)]), torch.tensor([params.get("top_k", 0)]),
                     torch.tensor([params.get("top_p", 1.0)]))[0].double()


FILTERS = [dict(), dict(top_k=3), dict(top_p=0.7), dict(temperature=0.6, top_k=4, top_p=0.9)]


def check_first_token(p, q, n, tol, **params):
    p_rows = torch.stack([p, p.roll(1)]).clamp(min=1e-30).log()
    q_row = q.clamp(min=1e-30).log()
    assert_close(first_token_distribution(p_rows, q_row, n, **params), target(p_rows[0], **params),
                 atol=tol, rtol=0, what="first emitted token")


@given(p=probability_rows(V), q=probability_rows(V), filt=st.sampled_from(FILTERS))
def test_first_token_follows_target(p, q, filt):
    check_first_token(p, q, n=4000, tol=1e-3, **filt)


@pytest.mark.extended
@settings(max_examples=300)
@given(p=probability_rows(V), q=probability_rows(V), filt=st.sampled_from(FILTERS))
def test_first_token_follows_target_many_rows(p, q, filt):
    check_first_token(p, q, n=20000, tol=1e-3, **filt)


def test_special_rows():
    g = torch.Generator().manual_seed(0)
    p = torch.rand(V, generator=g)
    p[1] = 0
    p = p / p.sum()
    zeros_q = p.clone()
    zeros_q[[0, 2]] = 0
    zeros_q /= zeros_q.sum()
    cases = {"p = q (acceptance 1)": (p, p), "disjoint supports": (p * (torch.arange(V) < 3), p * (torch.arange(V) >= 3)),
             "q zeros": (p, zeros_q)}
    for name, (pt, q) in cases.items():
        pt, q = pt / pt.sum(), q / q.sum()
        check_first_token(pt, q, n=4000, tol=1e-3)
    # p = q accepts every draft.
    acc, *_ = run(torch.stack([p, p]).log(), p.log()[None], torch.tensor([[2]]), 1, torch.rand(50, 1), torch.rand(50))
    assert (acc == 1).all()


def test_second_token_given_first_accepted():
    """γ = 2: once draft 1 is accepted, the second emitted token follows target row 1."""
    g = torch.Generator().manual_seed(1)
    p = torch.rand(3, V, generator=g).softmax(-1)
    q = torch.rand(2, V, generator=g).softmax(-1)
    n, x1 = 4000, 2
    u = grid(n)
    dist = torch.zeros(V, dtype=torch.float64)
    for x2 in range(V):
        drafts = torch.tensor([[x1, x2]])
        accept_u = torch.stack([torch.zeros(n), u], -1)  # u_1 = 0: draft 1 is always accepted
        acc, emitted, _, _ = run(p.log(), q.log(), drafts, 2, accept_u, torch.full((n,), 0.5))
        assert (acc >= 1).all() and (emitted[:, 0] == x1).all()
        p_acc = float((acc == 2).double().mean())
        dist[x2] += q[1, x2] * p_acc
        if p_acc < 1:
            accept_u = torch.stack([torch.zeros(n), torch.full((n,), ALMOST_ONE)], -1)
            acc, emitted, _, _ = run(p.log(), q.log(), drafts, 2, accept_u, u)
            assert (acc == 1).all()
            dist += q[1, x2] * (1 - p_acc) * torch.bincount(emitted[:, 1], minlength=V).double() / n
    assert_close(dist, p[1].double(), atol=1e-3, rtol=0, what="second emitted token")


def test_verify_len_zero_samples_the_bonus_from_row_zero():
    p = torch.tensor([0.1, 0.2, 0.3, 0.15, 0.25, 0.0])
    n = 4000
    u = (torch.arange(n) + 0.5) / n
    acc, emitted, num, _ = run(torch.stack([p, p.roll(2)]).clamp(min=1e-30).log(), torch.zeros(1, V),
                               torch.tensor([[1]]), 0, torch.zeros(n, 1), u)
    assert (acc == 0).all() and (num == 1).all()
    assert_close(torch.bincount(emitted[:, 0], minlength=V).double() / n, p.double(), atol=1.0 / n, rtol=0)


def test_all_accepted_takes_bonus_from_last_row_and_greedy_is_argmax():
    logits = torch.tensor([[0.0, 5.0, 1.0, 0.0, 0.0, 0.0],   # argmax 1
                           [0.0, 0.0, 0.0, 4.0, 0.0, 0.0],   # argmax 3
                           [2.0, 0.0, 0.0, 0.0, 0.0, 1.0]])  # argmax 0 (bonus)
    drafts = torch.tensor([[1, 3]])
    acc, emitted, num, stopped = run(logits, torch.randn(2, V), drafts, 2, torch.rand(5, 2), torch.rand(5),
                                     temperature=0.0)
    assert acc.tolist() == [2] * 5 and emitted[0].tolist() == [1, 3, 0] and num.tolist() == [3] * 5
    acc, emitted, num, _ = run(logits, torch.randn(2, V), torch.tensor([[1, 4]]), 2, torch.rand(5, 2), torch.rand(5),
                               temperature=0.0)
    assert acc.tolist() == [1] * 5 and emitted[0].tolist() == [1, 3, -1]  # correction = target argmax


def test_stop_token_among_accepted_drafts_ends_without_bonus():
    logits = torch.tensor([[0.0, 5.0, 0, 0, 0, 0], [0, 0, 0, 4.0, 0, 0], [2.0, 0, 0, 0, 0, 0]])
    acc, emitted, num, stopped = run(logits, torch.randn(2, V), torch.tensor([[1, 3]]), 2, torch.rand(3, 2),
                                     torch.rand(3), temperature=0.0, stop=(1,))
    assert acc.tolist() == [1] * 3 and num.tolist() == [1] * 3 and stopped.all()
    assert emitted[0].tolist() == [1, -1, -1]
    # A stop token drawn as the bonus is emitted and reported.
    acc, emitted, num, stopped = run(logits, torch.randn(2, V), torch.tensor([[1, 3]]), 2, torch.rand(3, 2),
                                     torch.rand(3), temperature=0.0, stop=(0,))
    assert num.tolist() == [3] * 3 and stopped.all() and emitted[0].tolist() == [1, 3, 0]
