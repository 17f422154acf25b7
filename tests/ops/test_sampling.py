"""Filtered sampling distributions (temperature, top-k, top-p) and inverse-CDF sampling."""

from __future__ import annotations

import torch
from hypothesis import given, strategies as st

from dspark.ops.rng import uniforms
from dspark.ops.sampling import probs_ref, sample_ref
from tests.compare import assert_close
from tests.strategies import probability_rows


def brute_force_probs(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """The tie-symmetric definitions, O(V²): survive top-k iff fewer than k tokens are strictly more
    likely; survive top-p iff the mass strictly more likely is below top_p."""
    v = logits.shape[-1]
    if temperature == 0:
        return torch.nn.functional.one_hot(logits.argmax(), v).double()
    p = torch.softmax(logits.double() / temperature, -1)
    if top_k > 0:
        more = (p.unsqueeze(0) > p.unsqueeze(1)).sum(-1)  # [V]: tokens strictly more likely than x
        p = torch.where(more < top_k, p, 0.0)
        p = p / p.sum()
    if top_p < 1:
        mass_above = torch.where(p.unsqueeze(0) > p.unsqueeze(1), p.unsqueeze(0), 0.0).sum(-1)
        p = torch.where(mass_above < top_p, p, 0.0)
        p = p / p.sum()
    return p


@given(rows=st.lists(probability_rows(11), min_size=1, max_size=6), temperature=st.sampled_from([0.0, 0.5, 1.0, 1.7]),
       top_k=st.sampled_from([0, 1, 2, 5, 11, 20]), top_p=st.sampled_from([1.0, 0.9, 0.5, 0.05]))
def test_probs_match_definition(rows, temperature, top_k, top_p):
    logits = torch.stack(rows).clamp(min=1e-30).log()
    n = logits.shape[0]
    got = probs_ref(logits, torch.full((n,), temperature), torch.full((n,), top_k), torch.full((n,), top_p))
    want = torch.stack([brute_force_probs(row, temperature, top_k, top_p) for row in logits])
    # The sort-based threshold can differ from the O(V²) mass only in the last fp32 bits.
    assert_close(got, want.float(), atol=1e-6, rtol=1e-5, what="filtered probs")


def test_ties_are_kept_and_greedy_takes_lowest_index():
    logits = torch.tensor([[1.0, 3.0, 3.0, 2.0, 3.0]])
    one = torch.ones(1)
    kept = probs_ref(logits, one, torch.tensor([1]), one)
    assert (kept[0] > 0).tolist() == [False, True, True, False, True]
    greedy = probs_ref(logits, torch.zeros(1), torch.tensor([0]), one)
    assert greedy[0].tolist() == [0.0, 1.0, 0.0, 0.0, 0.0]
    # top-p includes the crossing token and its ties: mass above each 3.0 token is 0 < 0.1.
    crossing = probs_ref(logits, one, torch.tensor([0]), torch.full((1,), 0.1))
    assert (crossing[0] > 0).tolist() == [False, True, True, False, True]


@given(row=probability_rows(9))
def test_stratified_sampling_is_exact(row):
    n = 4096
    u = (torch.arange(n) + 0.5) / n
    tokens = sample_ref(row.expand(n, -1), u)
    freq = torch.bincount(tokens, minlength=9).double() / n
    assert (freq[row == 0] == 0).all(), "a zero-probability token was sampled"
    assert_close(freq, row.double(), atol=1.0 / n + 1e-6, rtol=0, what="stratified frequencies")


def test_uniforms_are_reproducible_and_uniform():
    seed, offset = torch.tensor([3, 3, 4]), torch.tensor([0, 5, 0])
    u = uniforms(seed, offset, 20)
    assert torch.equal(u[0, 5:], u[1, :15]) and not torch.equal(u[0], u[2])
    big = uniforms(torch.tensor([11]), torch.tensor([0]), 200_000)[0]
    assert 0 <= float(big.min()) and float(big.max()) < 1
    hist = torch.histc(big, 20, 0, 1) / big.numel()
    assert float((hist - 0.05).abs().max()) < 0.003


def test_uniforms_use_every_seed_bit_and_keep_32_bit_streams():
    """Seeds that differ only above bit 31 give different streams (they used to collide); a seed below
    2^32 keeps the stream it had when only the low 32 bits were hashed."""
    from dspark.ops.rng import _MASK32, _hash32

    def low_bits_only(seed, offset, n):  # the earlier definition, for seeds < 2^32
        counter = offset.long().unsqueeze(-1) + torch.arange(n)
        x = _hash32(_hash32(seed.long() & _MASK32).unsqueeze(-1) ^ (counter & _MASK32))
        x = _hash32(x ^ _hash32((counter >> 32) + 0x9E3779B9))
        return (x >> 8).float() * (1.0 / (1 << 24))

    low = torch.tensor([0, 1, 12345, 2**32 - 1])
    offset = torch.tensor([0, 7, 2**33, 3])
    assert torch.equal(uniforms(low, offset, 16), low_bits_only(low, offset, 16))
    high = low + (torch.tensor([1, 2, 3, 2**30]) << 32)
    same = (uniforms(high, offset, 16) == uniforms(low, offset, 16)).all(-1)
    assert not same.any()
    seeds = torch.randint(0, 2**62, (512,), generator=torch.Generator().manual_seed(0)) & ~_MASK32  # low bits 0
    rows = uniforms(seeds, torch.zeros_like(seeds), 4)
    assert len({tuple(r.tolist()) for r in rows}) == len(seeds)
