"""Selection primitives shared by the sampling, rejection, Markov, indexer and router kernels.

Order keys. `order_key` maps fp32 to an int64 whose integer order is the float order, with −0.0 equal
to +0.0 and every NaN above +inf (torch's descending sort order), so "more likely", "higher score" and
"tied" are exact integer comparisons. `positive_zero` is the value side of the same canonicalisation.

K-th key search. Without sorting: an NCAND-way search over the int32 key range. Each pass measures a
monotone predicate at NCAND evenly spaced candidate keys (`search_candidates`) and keeps the
sub-interval at the first candidate where it holds (`search_narrow`); ≤ 8 passes narrow 2^32 keys to
one (16^8 = 2^32), ≤ 9 for the 2^32 + 1 of a half-open interval. `kth_key` is the counting instance
(the k-th largest key of a row, ties included, and how many keys lie strictly above it); sampling's
top-p search is a weighted instance of the same two steps.

Lowest-index top-k. Ties go to the lower index everywhere: `topk_lowest_index` is the reference rule
(a stable descending sort); the kernels reach it with `argmax_lowest` (max, then the lowest index
holding it) or, for the indexer's k of thousands, `kth_key` plus an index-order compaction of the ties.
"""

from __future__ import annotations

import torch

from dspark.ops._launch import tl, triton

NCAND = 16  # candidate keys per search pass


def topk_lowest_index(values: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest entries along the last dim; ties go to the lower index."""
    # A stable descending sort keeps equal values in index order.
    return torch.sort(values, dim=-1, descending=True, stable=True).indices[..., :k]


@triton.jit
def positive_zero(x):
    """x with −0.0 made +0.0 (the value whose bits `order_key` orders)."""
    return tl.where(x == 0.0, 0.0, x)


@triton.jit
def order_key(x):
    """fp32 → int64 key whose order is the float order, −0.0 = +0.0, every NaN above +inf (key 2^31 − 1):
    torch's descending sort order, compared exactly as integers."""
    x = positive_zero(x)
    b = x.to(tl.int32, bitcast=True)
    key = b ^ ((b >> 31) & 0x7FFFFFFF)
    return tl.where(x != x, 2147483647, key).to(tl.int64)


@triton.jit
def argmax_lowest(x, idx, NONE, AXIS: tl.constexpr):
    """(max of x along AXIS, the lowest idx where x equals it; NONE where no element does, e.g. all NaN)."""
    m = tl.max(x, axis=AXIS)
    return m, tl.min(tl.where(x == tl.expand_dims(m, AXIS), idx, NONE), axis=AXIS)


@triton.jit
def search_candidates(lo, hi, NCAND: tl.constexpr):
    """NCAND evenly spaced keys in (lo, hi], increasing, the last = hi → [NCAND] int64."""
    b = tl.arange(0, NCAND).to(tl.int64) + 1
    step = (hi - lo + NCAND - 1) // NCAND
    return tl.minimum(lo + b * step, hi)


@triton.jit
def search_narrow(lo, hi, cand, holds):
    """One search pass: a predicate that fails at lo, holds at hi and is monotone holds at the candidates
    `holds` (a suffix) → the new (lo, hi) around the first candidate where it holds."""
    new_hi = tl.min(tl.where(holds, cand, hi), axis=0)
    new_lo = tl.max(tl.where(holds, lo, cand), axis=0)
    return new_lo, new_hi


@triton.jit
def kth_key(row_ptr, n, n_sel, lo, hi, BLOCK: tl.constexpr, NCAND: tl.constexpr):
    """Over the fp32 row_ptr[0:n]: (κ, above), κ the largest key with #{key ≥ κ} ≥ n_sel — the n_sel-th
    largest key, ties included — and above = #{key > κ}. Needs lo < hi, #{key ≥ lo} ≥ n_sel (e.g. the row's
    min key) and #{key ≥ hi} < n_sel (e.g. its max key + 1). Each pass counts the keys ≥ NCAND candidates."""
    above = tl.zeros([], dtype=tl.int64)  # #{key ≥ hi}: 0 for hi = max + 1
    while hi - lo > 1:
        cand = search_candidates(lo, hi, NCAND)
        acc = tl.zeros([NCAND], dtype=tl.int64)
        for s0 in range(0, n, BLOCK):
            offs = s0 + tl.arange(0, BLOCK)
            ok = offs < n
            key = order_key(tl.load(row_ptr + offs, mask=ok, other=0.0).to(tl.float32))
            acc += tl.sum(((key[:, None] >= cand[None, :]) & ok[:, None]).to(tl.int64), axis=0)
        fails = acc < n_sel  # counts fall as candidates rise: the failing ones form a suffix
        above = tl.max(tl.where(fails, acc, above), axis=0)  # the count at the new hi
        lo, hi = search_narrow(lo, hi, cand, fails)
    return lo, above
