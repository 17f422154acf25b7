"""Verify-length schedulers: semantics, non-anticipation, and the paper's Appendix A counterexample."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, strategies as st

from dspark.decode import schedule
from dspark.ops.rejection import chain_rejection_ref


def monotone_sps(n: int, seed: int = 0) -> torch.Tensor:
    """A jagged, mostly decreasing steps-per-second table over batch sizes 0..n."""
    g = torch.Generator().manual_seed(seed)
    steps = 1.0 / (1.0 + 0.05 * torch.arange(n + 1) + 0.02 * torch.rand(n + 1, generator=g))
    return steps.cummin(0).values


def test_fixed_and_thresholds():
    conf = torch.tensor([[0.9, 0.2, 0.9, 0.9], [0.5, 0.9, 0.9, 0.1], [0.95, 0.95, 0.95, 0.95]])
    room = torch.tensor([4, 4, 2])
    assert schedule.fixed(conf, room).tolist() == [4, 4, 2]
    # per slot: first c < τ
    assert schedule.threshold_slot(conf, room, 0.3).tolist() == [1, 3, 2]
    # survival: a = cumprod; 0.9·0.2 = 0.18 < 0.3; 0.5 ≥ 0.3, 0.45 ≥ 0.3, 0.405 ≥ 0.3, 0.04 < 0.3
    assert schedule.threshold_survival(conf, room, 0.3).tolist() == [1, 3, 2]
    assert schedule.threshold_survival(conf, room, 0.42).tolist() == [1, 2, 2]
    assert schedule.threshold_slot(conf, room, 0.0).tolist() == [4, 4, 2]


def retrospective(confidence, room, active, sps):
    """The biased variant: the global argmax of Θ along the greedy path, without the early stop."""
    a_sorted, rows, ok = schedule._ranked(confidence, room)
    theta = schedule._objective(a_sorted, ok, active, sps)
    k = int(theta.argmax())
    admitted = (torch.arange(rows.numel()) < k) & ok
    return schedule._lengths_from(rows, admitted, confidence.shape[0])


def test_appendix_a_situation():
    """R=1, γ=2, SPS(1)=1, SPS(2)=0.5, SPS(3)=0.45, a_1 = 0.8: Θ0 = 1, Θ1 = 0.9, so the causal
    scheduler verifies nothing whatever c_2 says; the retrospective one verifies x_1 exactly when
    x_1 raised c_2, which biases the output (P(A) = 0.85 instead of p_t(A) = 0.7)."""
    sps = torch.tensor([0.0, 1.0, 0.5, 0.45])
    room, active = torch.tensor([2]), torch.tensor([True])
    high, low = torch.tensor([[0.8, 0.9]]), torch.tensor([[0.8, 0.0]])
    assert schedule.hardware(high, room, active, sps).tolist() == [0] == schedule.hardware(low, room, active, sps).tolist()
    assert retrospective(high, room, active, sps).tolist() == [2] and retrospective(low, room, active, sps).tolist() == [0]

    p_t = torch.tensor([[0.7, 0.3], [0.6, 0.4], [0.5, 0.5]]).log()
    q = torch.tensor([0.5, 0.5]).log()
    n = 2000
    u = (torch.arange(n) + 0.5) / n

    def p_first_token_a(scheduler) -> float:
        total = 0.0
        for x1, conf in ((0, high), (1, low)):  # token A raises c_2, token B zeroes it
            ell = int(scheduler(conf, room, active, sps))
            acc, emitted, _, _ = chain_rejection_ref(
                p_t.repeat(n, 1), torch.arange(n) * 3, torch.full((n,), ell), q.expand(n, 2, 2),
                torch.tensor([[x1, 0]]).expand(n, 2), torch.ones(n), torch.zeros(n, dtype=torch.long),
                torch.ones(n), torch.full((n, 1), -1), torch.stack([u, u.flip(0)], -1), u.roll(n // 3))
            total += 0.5 * float((emitted[:, 0] == 0).double().mean())
        return total

    assert abs(p_first_token_a(schedule.hardware) - 0.7) < 2e-3
    assert abs(p_first_token_a(retrospective) - 0.85) < 2e-3


@given(seed=st.integers(0, 2**16), r=st.integers(1, 6), gamma=st.integers(1, 7), slot=st.integers(0, 6),
       which=st.sampled_from(["hardware", "async", "slot", "survival"]))
def test_no_scheduler_anticipates_the_next_token(seed, r, gamma, slot, which):
    """Changing what draft token j+1 leads to (c_{r, j+1..}) never moves the admission of slot j."""
    slot = min(slot, gamma - 1)
    g = torch.Generator().manual_seed(seed)
    conf = torch.rand(r, gamma, generator=g) ** 0.3
    room = torch.randint(0, gamma + 1, (r,), generator=g)
    sps = monotone_sps(r * (gamma + 1) + 1, seed)
    k = torch.randint(0, r * gamma + 1, (1,), generator=g)[0]
    active = torch.rand(r, generator=g) < 0.8
    run = {"hardware": lambda c: schedule.hardware(c, room, active, sps), "async": lambda c: schedule.async_topk(c, room, k),
           "slot": lambda c: schedule.threshold_slot(c, room, 0.5),
           "survival": lambda c: schedule.threshold_survival(c, room, 0.3)}[which]
    base = run(conf)
    target = int(torch.randint(0, r, (1,), generator=g))
    for _ in range(4):
        changed = conf.clone()
        changed[target, slot + 1:] = torch.rand(gamma - slot - 1, generator=g)
        after = run(changed)
        assert (after[target] > slot) == (base[target] > slot)
        assert (after <= torch.minimum(room, torch.tensor(gamma))).all()


def algorithm_1(conf: torch.Tensor, room: torch.Tensor, active: torch.Tensor, sps: torch.Tensor) -> list[int]:
    """A plain-Python transcription of the paper's Algorithm 1 (causal version)."""
    r, gamma = conf.shape
    a = conf.double().cumprod(-1)
    cands = [(float(a[i, j]), j, i) for i in range(r) for j in range(gamma)
             if active[i] and j < room[i] and a[i, j] > 0]
    cands.sort(key=lambda c: (-c[0], c[1], c[2]))
    n = int(active.sum())
    ell, best_ell = [0] * r, [0] * r
    batch, tau = n, float(n)
    best = tau * float(sps[min(batch, len(sps) - 1)])
    for value, j, i in cands:
        ell[i] = j + 1
        batch += 1
        tau += value
        theta = tau * float(sps[min(batch, len(sps) - 1)])
        if theta > best:
            best, best_ell = theta, list(ell)
        else:
            break
    return best_ell


@given(seed=st.integers(0, 2**16), r=st.integers(1, 8), gamma=st.integers(1, 7))
def test_hardware_equals_algorithm_1(seed, r, gamma):
    g = torch.Generator().manual_seed(seed)
    conf = torch.rand(r, gamma, generator=g) ** 0.5
    room = torch.randint(0, gamma + 1, (r,), generator=g)
    active = torch.rand(r, generator=g) < 0.8
    sps = monotone_sps(r * (gamma + 1) + 1, seed) ** float(torch.rand(1, generator=g) * 8)
    got = schedule.hardware(conf, room, active, sps)
    assert got.tolist() == algorithm_1(conf, room, active, sps)
    assert (got[~active] == 0).all()


def test_capacity_uses_the_global_argmax():
    conf = torch.tensor([[0.9, 0.9, 0.9, 0.9]])
    room, active = torch.tensor([4]), torch.tensor([True])
    # Θ dips after one token then recovers: the causal greedy stops, the capacity does not.
    sps = torch.tensor([0.0, 1.0, 0.5, 0.45, 0.44, 0.43])
    assert int(schedule.hardware(conf, room, active, sps)[0]) == 0
    a = torch.tensor([0.9, 0.81, 0.729, 0.6561])
    theta = [1.0] + [(1 + float(a[:k].sum())) * float(sps[1 + k]) for k in range(1, 5)]
    assert int(schedule.capacity(conf, room, active, sps)) == max(range(5), key=lambda k: theta[k])
    assert schedule.async_topk(conf, room, torch.tensor(2)).tolist() == [2]


def test_schedulers_are_sync_free_tensors():
    conf = torch.rand(3, 5)
    active = torch.tensor([True, True, False])
    out = schedule.hardware(conf, torch.tensor([5, 2, 0]), active, monotone_sps(20))
    assert out.dtype == torch.long and out.shape == (3,)
    with pytest.raises(Exception):
        schedule.hardware(conf, torch.tensor([5, 2]), active, monotone_sps(20))
