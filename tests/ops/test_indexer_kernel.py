"""The lightning indexer's Triton kernel (`indexer_scores`, `indexer_topk`, fused `indexer_select`) against
its references, the top-k reference against a plain loop, batch invariance, validation and the
`dspark::indexer_*` registrations.

Discrete outputs (the top-k) are compared with `torch.equal` given the same scores: exact ties (integer
rows, all-equal rows, ±0.0, ±inf, NaN, duplicated or zero keys) are constructed, not hoped for.
Scores: products of fp32 / fp16 / bf16 inputs are exact in fp32 in both implementations, which differ only
in the order of their fp32 sums over Hi·di terms; so every dtype gets the fp32 table entry, with the
absolute tolerance widened to 8 fp32 ulps of the magnitude bound scale·Σ_h |w_h|·Σ_d |q_hd·k_d|
(`score_atol`; 64 ulps for 16-bit tensor-core dots on the GPU, whose fp32 accumulation need not round
to nearest). Cases with small-integer q, keys, w and di a power of 4 make every score exact in both
(di^-1/2 a power of two), so there the whole pipeline must match the reference bit for bit.
Paged mode (keys a pool [P, di], rows [B, W]): the kernel must equal the dense kernel on the gathered
keys bit for bit (same tiles, same sums), and the reference the dense reference; rows include −1 holes,
out-of-range values, duplicates and garbage (NaN / inf) pool rows behind hidden entries.
Outputs are poisoned before every launch (tests/ops/test_sampling_kernel.poisoned_outputs).
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from dspark.ops import _launch, indexer
from dspark.ops.indexer import (indexer_scores, indexer_scores_ref, indexer_select, indexer_select_ref, indexer_topk,
                                indexer_topk_ref)
from tests.compare import assert_close
from tests.helpers.kernels import poisoned_outputs
from tests.strategies import generator, seeds

needs_triton = pytest.mark.skipif(not _launch.HAS_TRITON, reason="needs triton")
# Garbage (NaN / inf) keys are scored on purpose: numpy, running the interpreted kernel, warns about it.
garbage_ok = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
ROW_KINDS = ("dense", "ties", "equal", "zeros", "inf", "nan", "near")
VISIBLE_KINDS = ("none", "one", "all", "over", "negative", "random", "random", "random")
EPS32 = torch.finfo(torch.float32).eps


def make_scores(kinds, w: int, g: torch.Generator) -> torch.Tensor:
    """[len(kinds), W] fp32, one row per kind: dense, small integers (many exact ties), all equal, ±0.0 mixed
    with a few positives, ±inf entries, NaN entries (both signs), or 0..3 ulps around one value."""
    rows = []
    for kind in kinds:
        r = torch.randn(w, generator=g)
        pick = lambda p: torch.rand(w, generator=g) < p  # noqa: E731
        if kind == "ties":
            r = torch.randint(0, 3, (w,), generator=g).float()
        elif kind == "equal":
            r = torch.full((w,), 1.5)
        elif kind == "zeros":
            r = torch.where(pick(0.5), -0.0, 0.0)
            r = torch.where(pick(0.1), 1.0, r)
        elif kind == "inf":
            r = torch.where(pick(0.3), -math.inf, r)
            r = torch.where(pick(0.1), math.inf, r)
        elif kind == "nan":
            r = torch.where(pick(0.2), math.nan, r)
            r = torch.where(pick(0.1), -torch.tensor(math.nan), r)
        elif kind == "near":
            r = torch.full((w,), 0.75)
            for _ in range(3):
                r = torch.where(pick(0.4), torch.nextafter(r, torch.full_like(r, math.inf)), r)
        rows.append(r)
    return torch.stack(rows)


def make_visible(kinds, w: int, g: torch.Generator) -> torch.Tensor:
    """[len(kinds)] int64: 0, 1, W, beyond W, negative (both clamp), or uniform in [0, W]."""
    values = {"none": 0, "one": 1, "all": w, "over": w + 3, "negative": -2}
    return torch.tensor([values[k] if k in values else int(torch.randint(0, w + 1, (1,), generator=g))
                         for k in kinds])


@st.composite
def topk_cases(draw, widths=(1, 2, 3, 7, 16, 37, 64), dtypes=(torch.float32, torch.float16)):
    """(scores [B, T, W], visible [B, T], k)."""
    b, t = draw(st.sampled_from([1, 2, 3])), draw(st.sampled_from([1, 2, 5]))
    w = draw(st.sampled_from(widths))
    g = generator(draw(seeds()))
    kinds = draw(st.lists(st.sampled_from(ROW_KINDS), min_size=b * t, max_size=b * t))
    vis = draw(st.lists(st.sampled_from(VISIBLE_KINDS), min_size=b * t, max_size=b * t))
    scores = make_scores(kinds, w, g).view(b, t, w).to(draw(st.sampled_from(dtypes)))
    k = draw(st.sampled_from([0, 1, 2, 3, 5, 16, w, w + 5, max(1, w // 2)]))
    return scores, make_visible(vis, w, g).view(b, t), k


def make_case(b, t, h, d, w, dtype, seed, *, exact=False, ties=True, garbage=True, device="cpu"):
    """(q [B, T, Hi, di], keys [B, W, di], w [B, T, Hi], visible [B, T]).

    exact: entries in {−2..2} (every score exact in fp32 when di is a power of 4). ties: some key rows are
    zero (score exactly 0) and some duplicate an earlier row (equal scores). garbage: keys no query of the
    batch row can see are NaN or inf."""
    g = generator(seed)
    if exact:
        q = torch.randint(-2, 3, (b, t, h, d), generator=g).float()
        keys = torch.randint(-2, 3, (b, w, d), generator=g).float()
        wts = torch.randint(-2, 3, (b, t, h), generator=g).float()
    else:
        q, keys = torch.randn(b, t, h, d, generator=g), torch.randn(b, w, d, generator=g)
        wts = torch.randn(b, t, h, generator=g)
    if ties and w > 1:
        keys[:, torch.rand(w, generator=g) < 0.2] = 0.0
        dup = torch.randint(0, w, (w // 3,), generator=g)
        keys[:, (dup + 1).clamp(max=w - 1)] = keys[:, dup]
    kinds = [VISIBLE_KINDS[i] for i in torch.randint(0, len(VISIBLE_KINDS), (b * t,), generator=g)]
    visible = make_visible(kinds, w, g).view(b, t)
    if garbage:
        seen = visible.clamp(0, w).amax(1)  # [B]
        junk = torch.where(torch.arange(w) % 2 == 0, math.nan, math.inf).view(1, w, 1)
        keys = torch.where((torch.arange(w) >= seen[:, None]).unsqueeze(-1), junk, keys)
    move = lambda x: x.to(device)  # noqa: E731
    return move(q.to(dtype)), move(keys.to(dtype)), move(wts), move(visible)


@st.composite
def scoring_cases(draw, max_w=70, dtypes=(torch.float32, torch.float16)):
    b, t = draw(st.sampled_from([1, 2, 3])), draw(st.sampled_from([1, 2, 5]))
    h = draw(st.sampled_from([1, 2, 5, 17, 65]))  # 65 crosses BLOCK_H = 64
    d = draw(st.sampled_from([1, 4, 7, 16, 33]))
    w = draw(st.sampled_from([n for n in (1, 2, 5, 16, 37, 64, 65) if n <= max_w]))  # 65 crosses BLOCK_W = 64
    dtype = draw(st.sampled_from(dtypes))
    return make_case(b, t, h, d, w, dtype, draw(seeds()), exact=draw(st.booleans()), ties=draw(st.booleans()),
                     garbage=draw(st.booleans()))


def naive_topk(scores: torch.Tensor, visible: torch.Tensor, k: int) -> torch.Tensor:
    """The docstring's rule, one row at a time: visible entries ranked by score (NaN first, −0.0 = +0.0),
    ties to the lower index, the first min(k, W) kept, listed by index, −1 padded."""
    b, t, n = scores.shape
    kk = min(k, n)
    out = torch.full((b, t, kk), -1, dtype=torch.long)
    for bi in range(b):
        for ti in range(t):
            row = scores[bi, ti].double().tolist()
            vis = range(min(max(int(visible[bi, ti]), 0), n))
            ranked = sorted(vis, key=lambda i: (not math.isnan(row[i]), -row[i] if not math.isnan(row[i]) else 0, i))
            chosen = sorted(ranked[:kk])
            out[bi, ti, :len(chosen)] = torch.tensor(chosen, dtype=torch.long)
    return out


def score_atol(q, keys, w) -> float:
    """A few fp32 ulps of the largest magnitude bound scale·Σ_h |w_h|·Σ_d |q_hd·k_d| (module docstring)."""
    ulps = 64 if q.is_cuda and q.dtype != torch.float32 else 8
    bound = indexer_scores_ref(q.float().abs(), keys.float().nan_to_num(0.0).abs(), w.float().abs())
    return max(1e-5, ulps * EPS32 * float(bound.max())) if bound.numel() else 1e-5


def assert_topk_equal(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    assert got.dtype == torch.long and got.shape == want.shape and got.is_contiguous(), what
    assert torch.equal(got, want), f"{what}:\n{got}\n!=\n{want}"


# ---------------------------------------------------------------------------------------------------
# Top-k: reference against the loop, kernel against the reference.


@given(case=topk_cases())
def test_topk_reference_matches_naive_loop(case):
    assert_topk_equal(indexer_topk_ref(*case), naive_topk(*case), "reference vs loop")


SPECIAL_ROW = [0.0, -0.0, 1.0, math.nan, -math.inf, -0.0, 0.0, -math.nan, math.inf, 1.0, -math.inf, 0.0]


@pytest.mark.parametrize("kernels", ["ref", pytest.param("triton", marks=needs_triton)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("visible, k, want", [
    (12, 6, [0, 2, 3, 7, 8, 9]),  # NaNs (either sign), +inf, the 1.0s, then the first zero
    (12, 7, [0, 1, 2, 3, 7, 8, 9]),  # −0.0 ties +0.0: index 1 before 5, 6, 11
    (12, 11, [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 11]),  # −inf ties: index 4 before 10
    (6, 4, [0, 1, 2, 3]),
    (6, 8, [0, 1, 2, 3, 4, 5, -1, -1]),
    (0, 3, [-1, -1, -1]),
    (-4, 2, [-1, -1]),
    (99, 20, list(range(12))),
])
def test_topk_special_values(kernels, dtype, visible, k, want):
    """The selection rule by hand on one row of ±0.0, ±inf and ±NaN."""
    scores = torch.tensor(SPECIAL_ROW).to(dtype).view(1, 1, -1)
    with poisoned_outputs():
        got = indexer_topk(scores, torch.tensor([[visible]]), k, kernels=kernels)
    assert_topk_equal(got, torch.tensor(want).view(1, 1, -1), "special values")


@needs_triton
@settings(max_examples=30)  # ~0.1 s per example
@given(case=topk_cases())
def test_topk_kernel_matches_reference(case):
    with poisoned_outputs():
        got = indexer_topk(*case, kernels="triton")
    assert_topk_equal(got, indexer_topk_ref(*case), "kernel")


@needs_triton
@pytest.mark.parametrize("k", [1, 150, 256, 299, 300])
def test_topk_kernel_rows_longer_than_a_tile(k):
    """W = 300 crosses BLOCK_S = 256: the compaction's position and tie counters carry across tiles, with
    the k-th score tied over both tiles in the integer and zero rows."""
    g = generator(k)
    scores = make_scores(["ties", "zeros", "dense", "near", "equal", "inf"], 300, g).view(2, 3, 300)
    visible = torch.tensor([[300, 290, 300], [260, 300, 257]])
    with poisoned_outputs():
        got = indexer_topk(scores, visible, k, kernels="triton")
    assert_topk_equal(got, indexer_topk_ref(scores, visible, k), "kernel")


# ---------------------------------------------------------------------------------------------------
# Scoring and the fused launch.


def check_scoring(q, keys, w, visible, k):
    with poisoned_outputs():
        scores = indexer_scores(q, keys, w, kernels="triton")
        fused_scores, fused_topk = indexer_select(q, keys, w, visible, k, kernels="triton")
    ref_scores = indexer_scores_ref(q, keys, w)
    assert scores.dtype == torch.float32 and scores.is_contiguous()
    assert_close(scores, ref_scores, dtype=torch.float32, atol=score_atol(q, keys, w), what="scores")
    assert torch.equal(fused_scores.nan_to_num(), scores.nan_to_num()) and torch.equal(
        fused_scores.isnan(), scores.isnan()), "fused scores differ from the scoring launch"
    # Given the kernel's own scores the selection is exact, ties included.
    assert_topk_equal(fused_topk, indexer_topk_ref(scores, visible, k), "fused top-k")
    return scores, fused_topk


@garbage_ok
@needs_triton
@given(case=scoring_cases(), k=st.sampled_from([0, 1, 3, 8, 40]))
def test_scores_and_fused_select_match_references(case, k):
    check_scoring(*case, k)


@garbage_ok
@needs_triton
@given(seed=seeds(), d=st.sampled_from([1, 4, 16]), h=st.sampled_from([1, 3, 17]), w=st.sampled_from([5, 37]),
       k=st.sampled_from([1, 4, 9]), dtype=st.sampled_from([torch.float32, torch.float16]))
def test_exact_scores_give_the_reference_selection(seed, d, h, w, k, dtype):
    """Small-integer inputs with di a power of 4: every score is exact in both implementations (many tie,
    zero keys and duplicated keys included), so the kernel's scores and top-k equal the references'."""
    case = make_case(2, 3, h, d, w, dtype, seed, exact=True)
    scores, topk = check_scoring(*case, k)
    want_scores, want_topk = indexer_select_ref(*case, k)
    assert torch.equal(scores.isnan(), want_scores.isnan())
    assert torch.equal(scores.nan_to_num(), want_scores.nan_to_num()), "exact scores differ"
    assert_topk_equal(topk, want_topk, "top-k from exact scores")


@needs_triton
@settings(max_examples=2)  # ten launches per example
@given(seed=seeds(), dtype=st.sampled_from([torch.float32, torch.float16]))
def test_batch_invariance(seed, dtype):
    """A query's scores and top-k are bit-identical alone, among other queries or batch rows, with more
    (hidden) entries appended, and with visible as int32 or as an expanded view."""
    b, t, h, d, w, k = 2, 3, 17, 33, 37, 6
    q, keys, wts, visible = make_case(b, t, h, d, w, dtype, seed, garbage=False)

    def run(q, keys, wts, visible):
        with poisoned_outputs():
            return indexer_select(q, keys, wts, visible, k, kernels="triton")

    def same(a, b_, what):
        assert torch.equal(a[0], b_[0]) and torch.equal(a[1], b_[1]), what

    full = run(q, keys, wts, visible)
    for rows in ([1], [1, 0]):
        part = run(q[rows], keys[rows], wts[rows], visible[rows])
        same(part, (full[0][rows], full[1][rows]), f"batch rows {rows}")
    for cols in ([2], [2, 0]):
        part = run(q[:, cols], keys, wts[:, cols], visible[:, cols])
        same(part, (full[0][:, cols], full[1][:, cols]), f"queries {cols}")
    longer = torch.cat([keys, torch.randn(b, 30, d).to(dtype)], dim=1)
    scores, topk = run(q, longer, wts, visible.clamp(max=w))
    ref_topk = run(q, keys, wts, visible.clamp(max=w))[1]
    assert torch.equal(scores[..., :w], full[0]) and torch.equal(topk, ref_topk), "depends on extra entries"
    same(run(q, keys, wts, visible.int()), full, "depends on the visible dtype")
    one = torch.full((b, t), w - 3)
    same(run(q, keys, wts, one[:1, :1].expand(b, t)), run(q, keys, wts, one), "depends on visible's strides")


# ---------------------------------------------------------------------------------------------------
# Paged keys: keys a pool [P, di], rows [B, W] naming each entry's pool row.

ROW_PATTERNS = ("valid", "holes", "out", "dups")


def make_paged_case(b, t, h, d, w, p, dtype, seed, patterns, *, garbage=True, rows_dtype=torch.int64,
                    device="cpu"):
    """(q [B, T, Hi, di], pool [P, di], w [B, T, Hi], visible [B, T], rows [B, W]).

    The pool's last P // 4 rows are garbage (NaN, inf). Entries some query of batch row b may see name, per
    patterns[b]: valid, clean rows only; holes, −1 here and there; out, values outside [0, P) (P, P + 1, −2,
    ±2^31 − 1); dups, at most two clean rows (duplicated keys, tied scores). garbage: entries no query of
    the row can see name garbage rows (else they follow the pattern)."""
    g = generator(seed)
    q, wts = torch.randn(b, t, h, d, generator=g), torch.randn(b, t, h, generator=g)
    bad = p // 4
    clean = p - bad
    pool = torch.randn(p, d, generator=g)
    pool[clean:] = torch.where(torch.arange(bad) % 2 == 0, math.nan, math.inf).view(bad, 1)
    kinds = [VISIBLE_KINDS[i] for i in torch.randint(0, len(VISIBLE_KINDS), (b * t,), generator=g)]
    visible = make_visible(kinds, w, g).view(b, t)
    seen = visible.clamp(0, w).amax(1)  # [B]
    outside = torch.tensor([p, p + 1, -2, 2**31 - 1, -(2**31) + 1])
    rows = torch.empty(b, w, dtype=torch.long)
    for bi, kind in enumerate(patterns):
        some = torch.rand(w, generator=g) < 0.3
        r = torch.randint(0, max(clean, 1), (w,), generator=g) if clean else torch.full((w,), -1)
        if kind == "holes":
            r = torch.where(some, -1, r)
        elif kind == "out":
            r = torch.where(some, outside[torch.randint(0, len(outside), (w,), generator=g)], r)
        elif kind == "dups" and clean:
            r = torch.randint(0, min(clean, 2), (w,), generator=g)
        if garbage and bad:
            r = torch.where(torch.arange(w) >= seen[bi], clean + torch.randint(0, bad, (w,), generator=g), r)
        rows[bi] = r
    move = lambda x: x.to(device)  # noqa: E731
    return move(q.to(dtype)), move(pool.to(dtype)), move(wts), move(visible), move(rows.to(rows_dtype))


@st.composite
def paged_cases(draw, max_w=100, max_p=130, dtypes=(torch.float32, torch.float16)):
    b = draw(st.sampled_from([1, 2, 3, 5, 7]))
    t = draw(st.sampled_from([1, 2, 3]))
    h = draw(st.sampled_from([1, 5, 17]))
    d = draw(st.sampled_from([1, 4, 7, 16, 33]))
    w = draw(st.sampled_from([n for n in (1, 2, 5, 37, 64, 65, 100, 129, 257, 300) if n <= max_w]))  # BLOCK_W = 64
    p = draw(st.sampled_from([n for n in (0, 1, 2, 7, 31, 64, 130, 600) if n <= max_p]))
    patterns = draw(st.lists(st.sampled_from(ROW_PATTERNS), min_size=b, max_size=b))
    case = make_paged_case(b, t, h, d, w, p, draw(st.sampled_from(dtypes)), draw(seeds()), patterns,
                           garbage=draw(st.booleans()), rows_dtype=draw(st.sampled_from([torch.int32, torch.int64])))
    if draw(st.booleans()):  # rows as a column-major view: any strides are read in place
        case = case[:4] + (case[4].t().contiguous().t(),)
    return case


def gathered(pool: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """The dense keys [B, W, di] paged mode stands for: pool rows, zero where a row is outside [0, P)."""
    p, d = pool.shape
    ok = (rows >= 0) & (rows < p)
    return torch.cat([pool, pool.new_zeros(1, d)])[torch.where(ok, rows, p).long()]


def clean_entries(pool: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """[B, 1, W] bool: the entry's key is finite (a clean pool row or a zero key)."""
    return torch.isfinite(gathered(pool, rows)).all(-1).unsqueeze(1)


def assert_same_bits(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    """Bit for bit (−0.0 ≠ +0.0), NaN payloads aside."""
    assert got.dtype == want.dtype == torch.float32 and got.shape == want.shape, what
    assert torch.equal(got.isnan(), want.isnan()), f"{what}: NaN positions differ"
    bits = lambda x: torch.where(x.isnan(), 0, x.view(torch.int32))  # noqa: E731
    assert torch.equal(bits(got), bits(want)), f"{what}: bits differ"


@garbage_ok
@given(case=paged_cases(max_w=300, max_p=600), k=st.sampled_from([0, 1, 3, 40]))
def test_paged_reference_is_the_dense_reference_on_gathered_keys(case, k):
    q, pool, wts, visible, rows = case
    keys = gathered(pool, rows)
    scores, topk = indexer_select_ref(q, pool, wts, visible, k, rows=rows)
    want_scores, want_topk = indexer_select_ref(q, keys, wts, visible, k)
    assert_same_bits(scores, want_scores, "paged reference scores")
    assert_same_bits(indexer_scores_ref(q, pool, wts, rows=rows), want_scores, "paged reference scores")
    assert_topk_equal(topk, want_topk, "paged reference top-k")
    assert torch.isfinite(scores.masked_select(clean_entries(pool, rows))).all(), "garbage reached a clean entry"


def check_paged(q, pool, wts, visible, rows, k):
    """Paged kernel == dense kernel on the gathered keys (bit for bit), ≈ the reference, selection exact."""
    keys = gathered(pool, rows)
    with poisoned_outputs():
        scores = indexer_scores(q, pool, wts, rows=rows, kernels="triton")
        fused_scores, fused_topk = indexer_select(q, pool, wts, visible, k, rows=rows, kernels="triton")
        dense_scores, dense_topk = indexer_select(q, keys, wts, visible, k, kernels="triton")
        split_topk = indexer_topk(scores, visible, k, kernels="triton")
    assert scores.is_contiguous() and fused_scores.is_contiguous()
    assert_same_bits(scores, dense_scores, "paged vs dense scores")
    assert_same_bits(fused_scores, dense_scores, "paged fused vs dense scores")
    assert_topk_equal(fused_topk, dense_topk, "paged vs dense top-k")
    assert_topk_equal(fused_topk, split_topk, "fused vs scores-then-top-k")
    assert_topk_equal(fused_topk, indexer_topk_ref(scores, visible, k), "paged top-k")
    assert_close(scores, indexer_scores_ref(q, pool, wts, rows=rows), dtype=torch.float32,
                 atol=score_atol(q, keys, wts), what="paged scores")
    assert torch.isfinite(scores.masked_select(clean_entries(pool, rows).to(scores.device))).all(), \
        "NaN / inf on an entry with a clean key"
    return scores, fused_topk


@garbage_ok
@needs_triton
@settings(max_examples=10)  # four launches per example
@given(case=paged_cases(), k=st.sampled_from([0, 1, 3, 8, 40]))
def test_paged_kernel_matches_dense_kernel_and_reference(case, k):
    check_paged(*case, k)


@garbage_ok
@needs_triton
@settings(max_examples=1)  # six launches
@given(seed=seeds(), dtype=st.sampled_from([torch.float32, torch.float16]))
def test_paged_batch_invariance(seed, dtype):
    """A query's paged scores and top-k are bit-identical alone or among other queries and batch rows,
    with rows int32, strided, or renumbered into a pool with more (garbage) rows in front."""
    q, pool, wts, visible, rows = make_paged_case(3, 2, 5, 7, 70, 40, dtype, seed, ["holes", "out", "dups"])
    k = 6

    def run(q, pool, wts, visible, rows):
        with poisoned_outputs():
            return indexer_select(q, pool, wts, visible, k, rows=rows, kernels="triton")

    def same(a, b_, what):
        assert_same_bits(a[0], b_[0], what)
        assert_topk_equal(a[1], b_[1], what)

    full = run(q, pool, wts, visible, rows)
    part = run(q[[2, 0]], pool, wts[[2, 0]], visible[[2, 0]], rows[[2, 0]])
    same(part, (full[0][[2, 0]], full[1][[2, 0]]), "batch rows [2, 0]")
    part = run(q[:, 1:], pool, wts[:, 1:], visible[:, 1:], rows)
    same(part, (full[0][:, 1:], full[1][:, 1:]), "query 1")
    same(run(q, pool, wts, visible, rows.int()), full, "rows int32")
    same(run(q, pool, wts, visible, torch.stack([rows, rows], -1)[..., 0]), full, "rows strided")
    ok = (rows >= 0) & (rows < pool.shape[0])
    front = torch.full((5, pool.shape[1]), math.nan, dtype=dtype)
    same(run(q, torch.cat([front, pool]), wts, visible, torch.where(ok, rows + 5, -1)), full, "renumbered pool")


@pytest.mark.parametrize("kernels", ["ref", pytest.param("triton", marks=needs_triton)])
def test_paged_validation(kernels):
    q, pool, wts, visible, rows = make_paged_case(2, 3, 5, 7, 11, 9, torch.float32, 0, ["valid", "holes"])
    keys = gathered(pool, rows)
    # A call mixing the modes fails with a message naming the mode, for either implementation.
    with pytest.raises(ValueError, match="pool"):
        indexer_scores(q, pool, wts, kernels=kernels)
    with pytest.raises(ValueError, match="paged"):
        indexer_select(q, keys, wts, visible, 3, rows=rows, kernels=kernels)
    if kernels == "ref":
        return
    bad = {
        "rows dtype": (pool, rows.float()),
        "rows int16": (pool, rows.short()),
        "rows rank 1": (pool, rows[0]),
        "rows rank 3": (pool, rows[..., None]),
        "rows batch": (pool, rows[:1]),
        "rows device": (pool, rows.to("meta")),
        "pool width": (pool[:, :6], rows),
        "pool dtype": (pool.double(), rows),
        "pool last stride": (pool.t().contiguous().t(), rows),
        "pool rank 1": (pool[0], rows),
    }
    for what, (keys_, rows_) in bad.items():
        for call in (lambda: indexer_scores(q, keys_, wts, rows=rows_, kernels="triton"),
                     lambda: indexer_select(q, keys_, wts, visible, 3, rows=rows_, kernels="triton")):
            with pytest.raises(ValueError):
                call()
                pytest.fail(what)
    # Empty launches: no queries, no entries, an empty pool (every row invalid: zero keys, score 0).
    assert indexer_scores(q[:, :0], pool, wts[:, :0], rows=rows, kernels="triton").shape == (2, 0, 11)
    s, top = indexer_select(q, pool, wts, visible, 4, rows=rows[:, :0], kernels="triton")
    assert s.shape == (2, 3, 0) and top.shape == (2, 3, 0)
    with poisoned_outputs():
        s, top = indexer_select(q, pool[:0], wts, visible, 4, rows=rows, kernels="triton")
    want_s, want_top = indexer_select_ref(q, pool[:0], wts, visible, 4, rows=rows)
    assert not s.any() and not want_s.any()
    assert_topk_equal(top, want_top, "empty pool")


# ---------------------------------------------------------------------------------------------------
# Layouts, validation, dispatch, registration.


@needs_triton
def test_layouts_and_validation():
    q, keys, w, visible = make_case(2, 3, 5, 7, 11, torch.float32, 0, garbage=False)
    want_scores = indexer_scores_ref(q, keys, w)
    # Strided views with unit last stride are read in place.
    qs = torch.randn(2, 3, 10, 9)[:, :, ::2, :7].copy_(q)
    ks = torch.randn(2, 13, 8)[:, 1:12, :7].copy_(keys)
    ws = torch.randn(5, 3, 2).permute(2, 1, 0).copy_(w)
    assert_close(indexer_scores(qs, ks, ws, kernels="triton"), want_scores, atol=score_atol(q, keys, w))
    ss = torch.randn(2, 3, 20)[..., 4:15].copy_(want_scores)
    assert torch.equal(indexer_topk(ss, visible, 4, kernels="triton"), indexer_topk_ref(want_scores, visible, 4))
    bad_scoring = {
        "q rank": (q[0], keys, w),
        "q dtype": (q.double(), keys, w),
        "keys dtype": (q, keys.double(), w),
        "keys width": (q, keys[..., :6], w),
        "keys batch": (q, keys[:1], w),
        "w shape": (q, keys, w[..., :4]),
        "w dtype": (q, keys, w.long()),
        "q last stride": (q.transpose(2, 3).contiguous().transpose(2, 3), keys, w),
        "keys last stride": (q, keys.transpose(1, 2).contiguous().transpose(1, 2), w),
        "no heads": (q[:, :, :0], keys, w[..., :0]),
    }
    for what, args in bad_scoring.items():
        for call in (lambda: indexer_scores(*args, kernels="triton"),
                     lambda: indexer_select(*args, visible, 3, kernels="triton")):
            with pytest.raises(ValueError):
                call()
                pytest.fail(what)
    bad_selection = {
        "scores dtype": (want_scores.double(), visible, 3),
        "scores rank": (want_scores[0], visible, 3),
        "scores last stride": (want_scores.transpose(1, 2).contiguous().transpose(1, 2), visible, 3),
        "visible dtype": (want_scores, visible.float(), 3),
        "visible shape": (want_scores, visible[:, :2], 3),
        "negative k": (want_scores, visible, -1),
    }
    for what, args in bad_selection.items():
        with pytest.raises(ValueError):
            indexer_topk(*args, kernels="triton")
            pytest.fail(what)
    with pytest.raises(ValueError):
        indexer_select(q, keys, w, visible.short(), 3, kernels="triton")
    # Empty launches: no queries, no entries, k = 0.
    assert indexer_scores(q[:, :0], keys, w[:, :0], kernels="triton").shape == (2, 0, 11)
    s, top = indexer_select(q, keys[:, :0], w, visible, 4, kernels="triton")
    assert s.shape == (2, 3, 0) and top.shape == (2, 3, 0)
    assert indexer_topk(want_scores, visible, 0, kernels="triton").shape == (2, 3, 0)
    s, top = indexer_select(q, keys, w, visible, 0, kernels="triton")
    assert_close(s, want_scores, atol=score_atol(q, keys, w))
    assert top.shape == (2, 3, 0)


def test_auto_uses_the_reference_on_cpu_and_under_autograd(monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("kernel launched")

    monkeypatch.setattr(indexer, "launch", boom)
    q, keys, w, visible = make_case(2, 3, 4, 8, 9, torch.float32, 1, garbage=False)
    scores = indexer_scores(q, keys, w)
    assert torch.equal(scores, indexer_scores_ref(q, keys, w))
    assert torch.equal(indexer_topk(scores, visible, 4), indexer_topk_ref(scores, visible, 4))
    for a, b in zip(indexer_select(q, keys, w, visible, 4), indexer_select_ref(q, keys, w, visible, 4)):
        assert torch.equal(a, b)
    q.requires_grad_(True)
    assert not _launch.use_triton("auto", q)  # a CUDA input with grad would pick the reference too
    indexer_scores(q, keys, w).sum().backward()
    assert torch.isfinite(q.grad).all()
    if _launch.HAS_TRITON:
        with pytest.raises(ValueError, match="forward-only"):
            indexer_scores(q, keys, w, kernels="triton")


@needs_triton
@pytest.mark.parametrize("op", ["indexer_scores", "indexer_topk", "indexer_select", "indexer_scores paged",
                                "indexer_select paged"])
def test_opcheck(op):
    """Schema, autograd registration, fake tensors (test_aot_dispatch_dynamic needs a GPU: see _launch.launch)."""
    q, keys, w, visible = make_case(2, 3, 5, 9, 13, torch.float32, 2, garbage=False)
    _, pool, _, _, rows = make_paged_case(2, 3, 5, 9, 13, 20, torch.float32, 2, ["holes", "out"], garbage=False)
    args = {"indexer_scores": (q, keys, w), "indexer_topk": (indexer_scores_ref(q, keys, w), visible, 4),
            "indexer_select": (q, keys, w, visible, 4), "indexer_scores paged": (q, pool, w),
            "indexer_select paged": (q, pool, w, visible, 4)}[op]
    kwargs = {"rows": rows} if op.endswith("paged") else {}
    torch.library.opcheck(getattr(torch.ops.dspark, op.split()[0]), args, kwargs,
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


# ---------------------------------------------------------------------------------------------------
# Larger sweeps.


@pytest.mark.extended
@needs_triton
@settings(max_examples=200)
@given(case=topk_cases(widths=(1, 5, 64, 255, 256, 257, 600)), data=st.data())
def test_topk_kernel_matches_reference_extended(case, data):
    scores, visible, k = case
    if data.draw(st.booleans()):
        k = data.draw(st.integers(0, scores.shape[-1] + 2))
    assert_topk_equal(indexer_topk(scores, visible, k, kernels="triton"), indexer_topk_ref(scores, visible, k),
                      "kernel")


@garbage_ok
@pytest.mark.extended
@needs_triton
@settings(max_examples=200)
@given(case=scoring_cases(max_w=200), k=st.integers(0, 80), data=st.data())
def test_scores_and_fused_select_extended(case, k, data):
    check_scoring(*case, k)
    if data.draw(st.booleans()):  # more heads than one block, wider entries
        big = make_case(2, 3, data.draw(st.sampled_from([65, 130])), 64, 150, case[0].dtype, data.draw(seeds()),
                        exact=data.draw(st.booleans()))
        check_scoring(*big, data.draw(st.sampled_from([16, 64, 200])))


@garbage_ok
@pytest.mark.extended
@needs_triton
@settings(max_examples=100)
@given(case=paged_cases(max_w=300, max_p=600), k=st.integers(0, 80))
def test_paged_kernel_extended(case, k):
    check_paged(*case, k)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_v4_shapes(dtype):
    """V4 indexer: Hi = 64, di = 128, top-512 of 3001 entries, 2 × 37 queries with causal-like visible
    counts; the separate top-k launch; batch invariance on the GPU; full opcheck (bf16)."""
    b, t, w, k = 2, 37, 3001, 512
    q, keys, wts, _ = make_case(b, t, 64, 128, w, dtype, 0, garbage=False, device="cuda")
    visible = torch.tensor([[0, 1, 511, 512, 513, 3001, 5000] + list(range(100, 3001, 100))[:30]] * b, device="cuda")
    scores, topk = check_scoring(q, keys, wts, visible, k)
    assert_topk_equal(indexer_topk(scores, visible, k, kernels="triton"), topk, "separate top-k launch")
    alone = indexer_select(q[1:, 20:21], keys[1:], wts[1:, 20:21], visible[1:, 20:21], k, kernels="triton")
    assert torch.equal(alone[0], scores[1:, 20:21]) and torch.equal(alone[1], topk[1:, 20:21])
    if dtype == torch.bfloat16:  # the full opcheck compiles through torch.compile: once is enough
        torch.library.opcheck(torch.ops.dspark.indexer_select, (q[:, :3], keys, wts[:, :3], visible[:, :3], k))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_paged_v4_shapes(dtype):
    """The model's cached CSA call: 37 query tokens as batch rows (T = 1), Hi = 64, di = 128, W = 4096 entries
    from a 20000-row pool, top-512, causal-like visible counts, −1 past visible except in a few rows naming
    garbage pool rows. Paged == dense on the gathered keys bit for bit, ≈ the reference; batch invariance."""
    b, w, p, k = 37, 4096, 20000, 512
    q, pool, wts, _, rows = make_paged_case(b, 1, 64, 128, w, p, dtype, 0, ["valid"] * b, garbage=False,
                                            device="cuda")
    visible = torch.tensor([0, 1, 511, 512, 513, 4096, 5000] + list(range(100, 4096, 137))[:30], device="cuda")
    hidden = torch.arange(w, device="cuda") >= visible[:, None]  # [B, W]
    junk = torch.randint(p - p // 4, p, (b, w), device="cuda")  # the garbage rows
    rows = torch.where(hidden, torch.where(torch.arange(b, device="cuda")[:, None] % 3 == 0, junk, -1), rows)
    visible = visible.view(b, 1)
    scores, topk = check_paged(q, pool, wts, visible, rows, k)
    alone = indexer_select(q[20:21], pool, wts[20:21], visible[20:21], k, rows=rows[20:21], kernels="triton")
    assert_same_bits(alone[0], scores[20:21], "alone")
    assert_topk_equal(alone[1], topk[20:21], "alone")
    if dtype == torch.bfloat16:  # the full opcheck compiles through torch.compile: once is enough
        torch.library.opcheck(torch.ops.dspark.indexer_select, (q[:3], pool, wts[:3], visible[:3], k),
                              {"rows": rows[:3]})
