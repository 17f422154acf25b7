"""Hypothesis strategies shared by the tests: sizes, token sequences, routings, distributions."""

from __future__ import annotations

import torch
from hypothesis import strategies as st

# Sizes that catch off-by-ones: 1, primes, non-powers of two, and powers of two.
SMALL_SIZES = st.sampled_from([1, 2, 3, 5, 7, 8, 11, 13, 16, 17, 31, 32, 37])


def sizes(max_value: int = 64) -> st.SearchStrategy[int]:
    return st.one_of(SMALL_SIZES.filter(lambda n: n <= max_value), st.integers(1, max_value))


def seeds() -> st.SearchStrategy[int]:
    return st.integers(0, 2**31 - 1)


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@st.composite
def routings(draw, num_tokens: int, num_experts: int, top_k: int):
    """[N, K] expert indices, distinct per row: random, all to one expert set, or with empty experts."""
    kind = draw(st.sampled_from(["random", "collide", "sparse"]))
    g = generator(draw(seeds()))
    if kind == "collide":  # every token to the same experts
        row = torch.randperm(num_experts, generator=g)[:top_k]
        return row.expand(num_tokens, top_k).clone()
    pool = num_experts if kind == "random" else max(top_k, num_experts // 2)  # leave experts empty
    return torch.rand(num_tokens, pool, generator=g).argsort(-1)[:, :top_k]


@st.composite
def probability_rows(draw, vocab: int):
    """A probability row with zeros, near-ties or a single spike."""
    g = generator(draw(seeds()))
    kind = draw(st.sampled_from(["dense", "zeros", "ties", "spike"]))
    p = torch.rand(vocab, generator=g, dtype=torch.float64)
    if kind == "zeros":
        p[torch.rand(vocab, generator=g) < 0.5] = 0
        p[0] += 1e-3
    elif kind == "ties":
        p = torch.full((vocab,), 1.0, dtype=torch.float64)
        p[: max(1, vocab // 3)] += 1e-12
    elif kind == "spike":
        p = torch.zeros(vocab, dtype=torch.float64)
        p[draw(st.integers(0, vocab - 1))] = 1
    return (p / p.sum()).float()
