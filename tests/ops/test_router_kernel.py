"""The MoE router kernel (`score_route`, `hash_route`; Triton, interpreter on CPU) against its references:
random and constructed routings, exact ties (within and across 16-expert tiles), NaN, batch invariance,
validation and the `dspark::score_route` / `dspark::hash_route` registrations. Outputs, and the [N, E] scores
workspace between the two launches, are poisoned before every launch.

Discrete outputs: indices match exactly wherever the selection is decided by more than rounding. With
small-integer inputs every logit is exact in both implementations, equal logits give equal scores and
distinct ones are far apart, so ties (repeated gate rows, an all-zero gate) must resolve to the lowest
index exactly as `topk_lowest_index`. With random inputs the two sum the D products in different orders
(and use different exp / log1p), so biased scores differ by rounding: a row may pick differently only
where two of its sorted first K + 1 biased scores are within `SELECT_TOL`, and even then the kernel's picks
must be as good as the reference's within that tolerance, with weights consistent with its own picks.

Tolerances: fp32 weights use the fp32 table (only rounding order and exp / log1p implementations
differ). fp16 / bf16 round logits and scores to the dtype in both, and a last-bit difference in the fp32
work before a rounding moves that value by one ulp (torch's CPU fp16 sqrt is also correctly rounded, where
the kernel rounds an fp32 sqrt, as torch's CUDA op does). A weight is a ratio of such scores, so its rtol
allows two worst-case ulps in numerator and denominator each: 2^-8 for fp16 (ulp ≤ 2^-10 relative), 2^-5
for bf16 (≤ 2^-7). Near-ties: `SELECT_TOL` relative to the case's largest |biased score|, 1e-5 for fp32
and again about four worst-case ulps for 16-bit dtypes.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, strategies as st

from dspark.ops import _launch
from dspark.ops.moe import (_ROUTE_BLOCK_E, _ROUTE_BLOCK_T, hash_route, hash_route_ref, route_ref, router_scores_ref,
                            score_route, score_route_ref)
from tests.compare import assert_close
from tests.helpers.kernels import poisoned_outputs
from tests.strategies import generator, seeds

needs_triton = pytest.mark.skipif(not _launch.HAS_TRITON, reason="needs triton")
SCORINGS = ("sqrtsoftplus", "sigmoid")
SCALING = 1.5
SELECT_TOL = {torch.float32: 1e-5, torch.float16: 2.0 ** -8, torch.bfloat16: 2.0 ** -5}
WEIGHT_TOL = {torch.float32: {}, torch.float16: dict(rtol=2.0 ** -8), torch.bfloat16: dict(rtol=2.0 ** -5)}


def make_case(n, e, d, k, dtype, seed, *, vocab=23, exact=False, scale=1.0, device="cpu"):
    """(x [N, D], gate_w [E, D], bias [E] fp32, tid2eid [V, K] int32, input_ids [N] int64).

    Random logits are about N(0, (2·scale)²): scale 10 crosses softplus's threshold 20 and saturates the
    sigmoid (ties at 1.0), yet keeps a row's best scores far from denormals (where exp rounds coarsely and
    the 1e-20 in the weights' denominator would dominate).

    exact: x in {−1, 0, 1} and gate rows with at most 3 entries in {−1, 1}, copied from E // 3 + 1
    prototypes (repeated rows tie exactly); bias in {0, 8}, far above the score range, so it only splits
    the experts into two tiers. tid2eid repeats experts within a row and holds some −1."""
    g = generator(seed)
    if exact:
        x = torch.randint(-1, 2, (n, d), generator=g).float()
        protos = torch.zeros(e // 3 + 1, d)
        for row in protos:
            row[torch.randperm(d, generator=g)[:3]] = torch.randint(0, 2, (min(3, d),), generator=g).float() * 2 - 1
        gate_w = protos[torch.randint(0, protos.shape[0], (e,), generator=g)]
        bias = 8.0 * torch.randint(0, 2, (e,), generator=g).float()
    else:
        x = torch.randn(n, d, generator=g) * scale
        gate_w = torch.randn(e, d, generator=g) * (2 / d ** 0.5)
        bias = torch.randn(e, generator=g) * 0.1
    table = torch.randint(-1, e, (vocab, k), generator=g).to(torch.int32)
    ids = torch.randint(0, vocab, (n,), generator=g)
    move = lambda t: t.to(device)  # noqa: E731
    return move(x.to(dtype)), move(gate_w.to(dtype)), move(bias), move(table), move(ids)


def run(kind, case, k, scoring, kernels="triton"):
    x, gate_w, bias, table, ids = case
    with poisoned_outputs():
        if kind == "hash":
            return hash_route(x, gate_w, table[:, :k], ids, scoring, SCALING, kernels=kernels)
        return score_route(x, gate_w, bias, k, scoring, SCALING, kernels=kernels)


def reference(kind, case, k, scoring):
    x, gate_w, bias, table, ids = case
    if kind == "hash":
        return hash_route_ref(x, gate_w, table[:, :k], ids, scoring, SCALING)
    return score_route_ref(x, gate_w, bias, k, scoring, SCALING)


def near_tied(biased: torch.Tensor, k: int, tol: float) -> torch.Tensor:
    """[N] bool: two of a row's sorted first k + 1 biased scores lie within tol (rounding may reorder them)."""
    top = biased.sort(dim=-1, descending=True).values[:, :k + 1]
    return ((top[:, :-1] - top[:, 1:]) <= tol).any(-1)


def check(kind, case, k, scoring, *, exact=False):
    """The kernel on the case's device against the reference on CPU (CPU linears accumulate fp16 / bf16 in
    fp32 then round, as the kernel; cuBLAS may reduce in reduced precision)."""
    weights, indices = (t.cpu() for t in run(kind, case, k, scoring))
    case = tuple(t.cpu() for t in case)
    x, gate_w, bias, _, _ = case
    dtype = x.dtype
    ref_w, ref_i = reference(kind, case, k, scoring)
    n = x.shape[0]
    assert weights.dtype == torch.float32 and weights.shape == (n, k)
    assert indices.dtype == torch.int64 and indices.shape == (n, k)
    scores = router_scores_ref(x, gate_w, scoring).float()  # [N, E]
    if kind == "score" and not exact:
        biased = scores + bias.float()
        tol = SELECT_TOL[dtype] * max(1.0, float(biased.abs().max()))
        firm = ~near_tied(biased, k, tol)
        assert torch.equal(indices[firm], ref_i[firm]), "indices differ where no near-tie excuses it"
        assert (indices.sort(-1).values.diff(dim=-1) > 0).all(), "an expert picked twice"
        assert_close(biased.gather(1, indices), biased.gather(1, ref_i), rtol=0, atol=tol, what="picked scores")
        ref_w = route_ref(scores, indices, SCALING)  # the weights of the kernel's own picks
    else:
        assert torch.equal(indices, ref_i), "indices"
    assert_close(weights, ref_w, dtype=torch.float32, what=f"{kind} weights", **WEIGHT_TOL[dtype])


@st.composite
def router_cases(draw, ns=(1, 2, 3, 7, 16, 17, 31, 40), es=(1, 2, 7, 8, 17, 24, 37, 60), ds=(1, 5, 16, 33, 70)):
    n, e, d = draw(st.sampled_from(ns)), draw(st.sampled_from(es)), draw(st.sampled_from(ds))
    k = draw(st.integers(1, min(e, 8)))
    dtype = draw(st.sampled_from([torch.float32, torch.float16]))
    return n, e, d, k, dtype, draw(seeds())


@needs_triton
# sigmoid(l) = 1 / (1 + exp(−l)): exp overflows to inf for l < −88 and the score is 0, as in torch.
@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")
@given(case=router_cases(), kind=st.sampled_from(["score", "hash"]), scoring=st.sampled_from(SCORINGS),
       scale=st.sampled_from([1.0, 1.0, 10.0]))
def test_kernel_matches_reference(case, kind, scoring, scale):
    n, e, d, k, dtype, seed = case
    check(kind, make_case(n, e, d, k, dtype, seed, scale=scale), k, scoring)


@needs_triton
@given(case=router_cases(ds=(1, 3, 8, 33)), scoring=st.sampled_from(SCORINGS),
       mode=st.sampled_from(["repeated", "zero", "one"]))
def test_ties_go_to_the_lowest_index(case, scoring, mode):
    """Exact logits: repeated gate rows (and coinciding integer logits) tie; an all-zero gate ties every
    expert, so the route is 0..K−1 in order; a bias on one expert makes every token pick it first."""
    n, e, d, k, dtype, seed = case
    x, gate_w, bias, table, ids = make_case(n, e, d, k, dtype, seed, exact=True)
    if mode == "zero":
        gate_w = torch.zeros_like(gate_w)
        bias = torch.zeros_like(bias)
    elif mode == "one":
        bias = torch.zeros_like(bias)
        bias[seed % e] = 8.0
    check("score", (x, gate_w, bias, table, ids), k, scoring, exact=True)
    if mode != "repeated":
        _, indices = run("score", (x, gate_w, bias, table, ids), k, scoring)
        first = seed % e if mode == "one" else 0
        assert (indices[:, 0] == first).all()
        if mode == "zero":
            assert torch.equal(indices, torch.arange(k).expand(n, k))


@needs_triton
@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")
@pytest.mark.parametrize("e", [17, 37, 257])
def test_experts_over_several_tiles(e):
    """E spans several expert tiles and the last is partial: random (fp32, scale 10) and exact (fp16) cases,
    score and hash routing."""
    k = 6
    for kind, scoring in (("score", "sqrtsoftplus"), ("hash", "sigmoid")):
        check(kind, make_case(18, e, 33, k, torch.float32, e, vocab=40, scale=10.0), k, scoring)
    check("score", make_case(18, e, 33, k, torch.float16, e + 1, exact=True), k, "sigmoid", exact=True)


@needs_triton
@pytest.mark.parametrize("k", [4, 8])
@pytest.mark.parametrize("via", ["gate", "bias"])
@pytest.mark.parametrize("scoring", SCORINGS)
def test_ties_across_expert_tiles_go_to_the_lowest_index(k, via, scoring):
    """Six experts in four 16-expert tiles tie for the best biased score: either side of the first two tile
    boundaries and two in the partial last tile, listed high index first. They come out in index order, then
    the lowest of the rest (which all tie below them). Ties through equal gate rows, or an equal bias over a
    zero gate."""
    b = _ROUTE_BLOCK_E
    e = 3 * b + 5
    tied = [e - 1, 2 * b, 3 * b + 1, b, b - 1, 2 * b - 1]
    n, d = 6, 8
    g = generator(k)
    x = torch.randint(1, 3, (n, d), generator=g).float()  # logits of the tied rows ≥ 1 > 0, the others'
    gate_w = torch.zeros(e, d)
    bias = torch.zeros(e)
    if via == "gate":
        gate_w[tied, 0] = 1.0
    else:
        bias[tied] = 8.0
    table, ids = torch.zeros(1, k, dtype=torch.int32), torch.zeros(n, dtype=torch.long)
    case = (x, gate_w, bias, table, ids)
    check("score", case, k, scoring, exact=True)
    _, indices = run("score", case, k, scoring)
    want = (sorted(tied) + [0, 1])[:k]
    assert torch.equal(indices, torch.tensor(want).expand(n, k))


@needs_triton
@pytest.mark.parametrize("scoring", SCORINGS)
def test_hash_routing_with_repeats_nowhere_and_one_row(scoring):
    """Table rows repeat experts and hold −1 (weight 0); then every token maps to the same table row."""
    x, gate_w, bias, table, ids = make_case(19, 7, 12, 4, torch.float32, 3)
    table[0] = torch.tensor([5, 5, -1, 2], dtype=torch.int32)
    ids[:4] = 0
    check("hash", (x, gate_w, bias, table, ids), 4, scoring)
    weights, _ = run("hash", (x, gate_w, bias, table, ids), 4, scoring)
    assert (weights[:4, 2] == 0).all()
    check("hash", (x, gate_w, bias, table, torch.zeros_like(ids)), 4, scoring)


@needs_triton
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("kind", ["score", "hash"])
def test_nan_routes_like_the_reference(kind):
    """A NaN token: NaN ranks first, every expert ties, so it routes to 0..K−1 with NaN weights; its
    neighbours in the tile are untouched."""
    x, gate_w, bias, table, ids = make_case(5, 9, 6, 3, torch.float32, 4, exact=True)
    table[:, :] = torch.tensor([1, 4, -1], dtype=torch.int32)
    x[2, 1] = math.nan
    weights, indices = run(kind, (x, gate_w, bias, table, ids), 3, "sqrtsoftplus")
    ref_w, ref_i = reference(kind, (x, gate_w, bias, table, ids), 3, "sqrtsoftplus")
    assert torch.equal(indices, ref_i)
    if kind == "score":
        assert indices[2].tolist() == [0, 1, 2]
    assert weights[2].isnan().all() and not weights[[0, 1, 3, 4]].isnan().any()
    assert_close(weights, ref_w, what="weights with a NaN token")


@needs_triton
@pytest.mark.parametrize("kind", ["score", "hash"])
def test_a_token_result_does_not_depend_on_its_batch(kind):
    """Bit-identical whether a token runs alone or inside a batch. On CPU only at the same position in its
    16-token tile: the interpreter's tl.dot is a BLAS call whose result for a row can move by an ulp with
    the row's position (the GPU test below checks every position). That tile is the scores kernel's; the
    select kernel's 4-token tiles are exact per token."""
    case = make_case(40, 24, 70, 6, torch.float32, 5)
    full = run(kind, case, 6, "sqrtsoftplus")
    for start, stop in ((16, 17), (32, 40), (16, 40), (0, 1)):
        part = run(kind, tuple(t[start:stop] if t.shape[0] == 40 else t for t in case), 6, "sqrtsoftplus")
        assert start % _ROUTE_BLOCK_T == 0
        for got, want in zip(part, full):
            assert torch.equal(got, want[start:stop])


@needs_triton
@pytest.mark.parametrize("kind", ["score", "hash"])
def test_strided_inputs(kind):
    """Row-strided x and gate_w, a strided bias, a column-major tid2eid and expanded input_ids: the strides
    go to the kernel, nothing is copied."""
    x, gate_w, bias, table, _ = make_case(21, 13, 9, 3, torch.float32, 9)
    x = torch.cat([x, torch.full_like(x, math.nan)], 1)[:, :9]
    gate_w = torch.cat([torch.full_like(gate_w, math.nan), gate_w], 1)[:, 9:]
    bias = torch.stack([bias, torch.full_like(bias, math.nan)], 1)[:, 0]
    table = table.t().contiguous().t()
    ids = torch.tensor([5]).expand(21)
    check(kind, (x, gate_w, bias, table, ids), 3, "sqrtsoftplus")


@needs_triton
def test_auto_on_cpu_is_the_reference_and_k_zero_is_empty():
    case = make_case(6, 8, 10, 3, torch.float32, 6)
    for kind in ("score", "hash"):
        got, want = run(kind, case, 3, "sigmoid", kernels="auto"), reference(kind, case, 3, "sigmoid")
        assert all(torch.equal(a, b) for a, b in zip(got, want))
    weights, indices = run("score", case, 0, "sigmoid")
    assert weights.shape == indices.shape == (6, 0)


@needs_triton
def test_bad_inputs_raise():
    x, gate_w, bias, table, ids = make_case(4, 6, 8, 2, torch.float32, 0)
    bad_score = [
        (dict(gate_w=gate_w.half()), "gate_w"),
        (dict(gate_w=gate_w[:, :5]), "gate_w"),
        (dict(x=x.t().contiguous().t()), "x"),
        (dict(bias=bias[:5]), "bias"),
        (dict(k=7), "k must be"),
        (dict(scoring_func="softmax"), "scoring_func"),
    ]
    for change, match in bad_score:
        args = dict(x=x, gate_w=gate_w, bias=bias, k=2, scoring_func="sigmoid", scaling=1.0) | change
        with pytest.raises(ValueError, match=match):
            score_route(**args, kernels="triton")
    with pytest.raises(ValueError, match="input_ids"):
        hash_route(x, gate_w, table, ids[:3], "sigmoid", 1.0, kernels="triton")
    with pytest.raises(ValueError, match="tid2eid"):
        hash_route(x, gate_w, table.float(), ids, "sigmoid", 1.0, kernels="triton")


@needs_triton
def test_opcheck():
    x, gate_w, bias, table, ids = make_case(5, 6, 8, 2, torch.float32, 1)
    utils = ("test_schema", "test_faketensor")
    torch.library.opcheck(torch.ops.dspark.score_route.default, (x, gate_w, bias, 2, "sqrtsoftplus", 1.5),
                          test_utils=utils)
    torch.library.opcheck(torch.ops.dspark.hash_route.default, (x, gate_w, table, ids, "sigmoid", 1.5),
                          test_utils=utils)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("kind", ["score", "hash"])
def test_gpu_matches_reference_and_is_batch_invariant(dtype, kind):
    """V4-Flash's router shape (E = 256, K = 6, D = 4096) on the GPU, through kernels="auto"."""
    case = make_case(40, 256, 4096, 6, dtype, 7, vocab=1000, device="cuda")
    for scoring in SCORINGS:
        check(kind, case, 6, scoring)
        full = run(kind, case, 6, scoring, kernels="auto")
        for t in (0, 7, 39):
            alone = run(kind, tuple(v[t:t + 1] if v.shape[0] == 40 else v for v in case), 6, scoring, kernels="auto")
            for got, want in zip(alone, full):
                assert torch.equal(got[0], want[t])
    exact = make_case(33, 60, 33, 6, dtype, 8, exact=True, device="cuda")
    check("score", exact, 6, "sqrtsoftplus", exact=True)


@needs_triton
# sigmoid(l) = 1 / (1 + exp(−l)): exp overflows to inf for l < −88 and the score is 0, as in torch.
@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")
@pytest.mark.extended
@given(n=st.integers(1, 200), e=st.integers(1, 300), d=st.integers(1, 300), data=st.data())
def test_kernel_matches_reference_extended(n, e, d, data):
    k = data.draw(st.integers(1, min(e, 8)))
    dtype = data.draw(st.sampled_from([torch.float32, torch.float16]))
    exact = data.draw(st.booleans())
    case = make_case(n, e, d, k, dtype, data.draw(seeds()), exact=exact, scale=data.draw(st.sampled_from([1.0, 10.0])))
    check(data.draw(st.sampled_from(["score", "hash"])), case, k, data.draw(st.sampled_from(SCORINGS)), exact=exact)
