"""Helpers shared by the kernel tests (tests/ops): poisoned outputs, exact comparison, and the sampling
strategies (logit rows with ties, near-ties, ±0.0 and −inf; per-row filter parameters)."""

from __future__ import annotations

import contextlib
import math
from unittest import mock

import torch
from hypothesis import strategies as st

from dspark.ops.sampling import probs_ref
from tests.compare import assert_close
from tests.strategies import generator, probability_rows, seeds

TEMPERATURES = [0.0, 1e-3, 0.5, 1.0, 1.7]
TOP_PS = [1.0, 0.999, 0.9, 0.5, 0.05, 1e-7, 0.0]
ALMOST_ONE = 1.0 - 2.0 ** -24


@contextlib.contextmanager
def poisoned_outputs():
    """Every torch.empty inside the block comes back poisoned: NaN floats, −7777 ints, True bools, so an
    element a kernel forgets to write fails the comparison."""
    real = torch.empty

    def empty(*args, **kwargs):
        t = real(*args, **kwargs)
        if t.is_floating_point():
            t.fill_(float("nan"))
        elif t.dtype == torch.bool:
            t.fill_(True)
        else:
            t.fill_(-7777)
        return t

    with mock.patch.object(torch, "empty", empty):
        yield


@st.composite
def logit_rows(draw, n: int, vocab: int) -> torch.Tensor:
    """[n, vocab] fp32 logits, each row one of: dense at several scales, exact ties, 1-ulp near-ties, all
    equal (±0.0 mixed), −inf entries, logs of probability rows with zeros, or a very wide range."""
    rows = []
    for _ in range(n):
        g = generator(draw(seeds()))
        kind = draw(st.sampled_from(["dense", "ties", "near", "equal", "neg_inf", "prob", "wide"]))
        if kind == "dense":
            row = torch.randn(vocab, generator=g) * draw(st.sampled_from([0.1, 1.0, 5.0, 30.0]))
        elif kind == "ties":
            row = torch.randint(0, 3, (vocab,), generator=g).float()
        elif kind == "near":  # values 0..3 ulps around a base: distinct logits, near-equal weights
            base = torch.full((vocab,), draw(st.sampled_from([0.0, 1.0, -3.5, 17.25])))
            row = base
            for _ in range(3):
                up = torch.rand(vocab, generator=g) < 0.4
                row = torch.where(up, torch.nextafter(row, torch.full_like(row, math.inf)), row)
        elif kind == "equal":
            value = draw(st.sampled_from([0.0, 2.0, -1e4]))
            row = torch.full((vocab,), value)
            if value == 0.0:
                row = torch.where(torch.rand(vocab, generator=g) < 0.5, -0.0, 0.0)
        elif kind == "neg_inf":
            row = torch.randn(vocab, generator=g)
            row[torch.rand(vocab, generator=g) < 0.4] = -math.inf
            row[int(torch.randint(0, vocab, (1,), generator=g))] = 0.5  # at least one finite value
        elif kind == "prob":
            row = draw(probability_rows(vocab)).log()  # zeros → −inf
        else:
            row = torch.randn(vocab, generator=g) * 1000
        rows.append(row)
    return torch.stack(rows)


@st.composite
def filter_params(draw, n: int, vocab: int, logits: torch.Tensor | None = None):
    """Per-row temperature / top_k / top_p mixes; some top_p sit exactly on a reference mass boundary."""
    t = torch.tensor([draw(st.sampled_from(TEMPERATURES)) for _ in range(n)], dtype=torch.float32)
    k = torch.tensor([draw(st.sampled_from([0, 1, 2, 3, vocab, vocab + 5, max(1, vocab // 2)])) for _ in range(n)])
    p = torch.tensor([draw(st.sampled_from(TOP_PS)) for _ in range(n)], dtype=torch.float32)
    if logits is not None and draw(st.booleans()):  # top_p = a prefix mass / total, ± 1 ulp
        i = draw(st.integers(0, n - 1))
        w = probs_ref(logits[i:i + 1], t[i:i + 1].clamp(min=0.5), torch.zeros(1, dtype=torch.long),
                      torch.ones(1)).double()[0]
        cut = float(w.sort(descending=True).values.cumsum(0)[draw(st.integers(0, vocab - 1))])
        nudge = draw(st.sampled_from([0, 1, -1]))
        value = torch.tensor(min(cut, 1.0), dtype=torch.float32)
        if nudge:
            value = torch.nextafter(value, torch.tensor(nudge * math.inf))
        t[i], p[i] = max(float(t[i]), 0.5), float(value.clamp(0, 1))
    return t, k, p


def assert_equal(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    assert_close(got.double(), want.double(), atol=0, rtol=0, what=what)
    assert torch.equal(got, want), f"{what}: not bit-identical"
