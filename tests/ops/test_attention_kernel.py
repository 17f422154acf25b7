"""Sink attention over the latent K=V pool: `sparse_sink_attention` (Triton) against its reference, the
reference against a per-(t, h) loop in fp64, batch invariance (bit-identical per query whatever else is
launched), exact zeros for queries with no valid slot, the dense `sink_attention` wrapper, validation and
the `dspark::sparse_sink_attention` registration.

Tolerances: fp32 uses the table's defaults. fp16 / bf16 outputs are widened by atol = 2u·max|k| (u the
dtype's unit roundoff): the kernel rounds p to the input dtype before the p·V dot (as HF's eager attention
casts probabilities to the value dtype), which moves out by at most u·Σ_s p_s·|k_s| ≤ u·max|k| before the
final rounding; the factor 2 covers the two outputs' final roundings landing in different binades.
Unreferenced pool rows hold NaN / inf in every case, and outputs are poisoned with NaN before launch.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from dspark.ops import _launch, attention
from dspark.ops.attention import (sink_attention, sink_attention_ref, sparse_sink_attention,
                                  sparse_sink_attention_ref)
from tests.compare import assert_close
from tests.helpers.kernels import poisoned_outputs
from tests.strategies import generator, seeds

needs_triton = pytest.mark.skipif(not _launch.HAS_TRITON, reason="needs triton")
PATTERNS = ("valid", "masked", "dups", "holes", "range", "prefix")


def make_index(t: int, s: int, p: int, patterns, g: torch.Generator) -> torch.Tensor:
    """[T, S] int32, one pattern per row: all valid, all masked (−1), one pool row repeated, random −1
    holes, values outside [0, P) (−3 … P+2, all masked), or a valid prefix then −1 (ragged lengths)."""
    rows = []
    for kind in patterns:
        r = torch.randint(0, p, (s,), generator=g) if p else torch.full((s,), -1)
        if kind == "masked" or p == 0:
            r = torch.full((s,), -1)
        elif kind == "dups":
            r = torch.full((s,), int(torch.randint(0, p, (1,), generator=g)))
        elif kind == "holes":
            r = torch.where(torch.rand(s, generator=g) < 0.5, r, -1)
        elif kind == "range":
            r = torch.randint(-3, p + 3, (s,), generator=g)
        elif kind == "prefix":
            r = torch.where(torch.arange(s) < int(torch.randint(0, s + 1, (1,), generator=g)), r, -1)
        rows.append(r)
    return torch.stack(rows).to(torch.int32) if rows else torch.empty(0, s, dtype=torch.int32)


def referenced(index: torch.Tensor, p: int) -> torch.Tensor:
    """bool [P]: pool rows some valid slot names."""
    used = torch.zeros(p + 1, dtype=torch.bool)
    used[torch.where((index >= 0) & (index < p), index, p).long().flatten()] = True
    return used[:p]


def make_case(t, h, d, s, p, dtype, seed, patterns=None, q_scale=1.0, sink_scale=1.0, device="cpu"):
    """(q, pool, index, sinks, scale); pool rows no valid slot names alternate NaN / inf."""
    g = generator(seed)
    q = torch.randn(t, h, d, generator=g) * q_scale
    pool = torch.randn(p, d, generator=g)
    index = make_index(t, s, p, patterns or ["holes"] * t, g)
    unused = ~referenced(index, p)
    garbage = torch.where(torch.arange(p) % 2 == 0, float("nan"), float("inf"))
    pool = torch.where(unused.unsqueeze(-1), garbage.unsqueeze(-1), pool)
    sinks = torch.randn(h, generator=g) * sink_scale
    move = lambda x: x.to(device)  # noqa: E731
    return move(q.to(dtype)), move(pool.to(dtype)), move(index), move(sinks), d ** -0.5


@st.composite
def attention_cases(draw, dtypes=(torch.float32, torch.float16), max_t=7):
    t = draw(st.sampled_from([n for n in (1, 2, 3, 5, 7, 17) if n <= max_t]))
    h = draw(st.sampled_from([1, 2, 3, 5, 16, 17]))  # 17 crosses BLOCK_H = 16
    d = draw(st.sampled_from([1, 7, 16, 33, 64]))
    s = draw(st.sampled_from([1, 2, 5, 16, 33, 37]))  # 33, 37 cross BLOCK_S = 32
    p = draw(st.sampled_from([1, 2, 7, 31, 64]))
    patterns = draw(st.lists(st.sampled_from(PATTERNS), min_size=t, max_size=t))
    dtype = draw(st.sampled_from(dtypes))
    q_scale = draw(st.sampled_from([0.1, 1.0, 10.0]))  # 10: peaked softmax
    sink_scale = draw(st.sampled_from([0.0, 1.0, 10.0]))  # 10: sinks dominating or negligible
    return make_case(t, h, d, s, p, dtype, draw(seeds()), patterns, q_scale, sink_scale)


def naive_loop(q, pool, index, sinks, scale) -> torch.Tensor:
    """The docstring's sentences, one query and head at a time, in fp64 → [T, H, D] fp64."""
    t, h, d = q.shape
    out = torch.zeros(t, h, d, dtype=torch.float64)
    for ti in range(t):
        rows = [int(r) for r in index[ti] if 0 <= int(r) < pool.shape[0]]
        keys = pool[rows].double() if rows else torch.zeros(0, d, dtype=torch.float64)  # [n, D]
        for hi in range(h):
            logits = [float(q[ti, hi].double() @ k) * scale for k in keys] + [float(sinks[hi])]
            top = max(logits)
            w = [math.exp(x - top) for x in logits]
            for j, k in enumerate(keys):
                out[ti, hi] += w[j] / sum(w) * k
    return out


def tolerance(dtype: torch.dtype, keys: torch.Tensor) -> dict:
    """The dtype's table entry; for fp16 / bf16 atol = 2u·max|k| over the keys a query may read (module
    docstring)."""
    if dtype == torch.float32:
        return {}
    kmax = float(keys.abs().max()) if keys.numel() else 0.0
    return dict(atol=max(1e-5, torch.finfo(dtype).eps * kmax))  # eps = 2u


def used_keys(pool: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    return pool[referenced(index.cpu(), pool.shape[0]).to(pool.device)]


def run_kernel(q, pool, index, sinks, scale):
    with poisoned_outputs():
        return sparse_sink_attention(q, pool, index, sinks, scale, kernels="triton")


@given(case=attention_cases())
def test_reference_matches_naive_loop(case):
    """Both in fp64 / fp32 and rounded once to q's dtype: the table's tolerance."""
    q, pool, index, sinks, scale = case
    got = sparse_sink_attention_ref(*case)
    assert got.dtype == q.dtype and got.shape == q.shape
    assert_close(got, naive_loop(*case).to(q.dtype), what="reference vs loop")


@needs_triton
@given(case=attention_cases())
def test_kernel_matches_reference(case):
    q, pool, index, sinks, scale = case
    got = run_kernel(*case)
    assert got.dtype == q.dtype and got.shape == q.shape and got.is_contiguous()
    assert_close(got, sparse_sink_attention_ref(*case), **tolerance(q.dtype, used_keys(pool, index)), what="kernel")


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("sink", [-1e4, 0.0, 30.0])
def test_empty_rows_are_exact_zeros(dtype, sink):
    """No valid slot (−1, negative, ≥ P, or S = 0) → exactly 0 from kernel and reference, whatever the sink,
    with every pool row NaN."""
    q = torch.randn(4, 3, 9).to(dtype)
    pool = torch.full((5, 9), float("nan"), dtype=dtype)
    index = torch.tensor([[-1, -1, -1], [-2, 5, 7], [-1, 5, -9], [-1, -1, -1]], dtype=torch.int32)
    sinks = torch.full((3,), sink)
    for kernels in ("ref", "triton"):
        with poisoned_outputs():
            out = sparse_sink_attention(q, pool, index, sinks, 0.3, kernels=kernels)
            none = sparse_sink_attention(q, pool, index[:, :0], sinks, 0.3, kernels=kernels)
        assert torch.equal(out, torch.zeros_like(out)), kernels
        assert torch.equal(none, torch.zeros_like(none)), kernels


@needs_triton
@settings(max_examples=4)  # nine launches per example
@given(seed=seeds(), dtype=st.sampled_from([torch.float32, torch.float16]), d=st.sampled_from([7, 33]))
def test_batch_invariance(seed, dtype, d):
    """A query's output is bit-identical alone, in any subset or order of queries, with different garbage
    in unreferenced pool rows, with a longer pool, and with its index row padded by −1 slots."""
    t, h, s, p = 9, 5, 37, 29
    patterns = ["valid", "holes", "masked", "dups", "prefix", "holes", "valid", "holes", "prefix"]
    q, pool, index, sinks, scale = make_case(t, h, d, s, p, dtype, seed, patterns)
    full = run_kernel(q, pool, index, sinks, scale)
    for rows in ([4], [8], [7, 2, 5], list(range(3, 8))):
        rows = torch.tensor(rows)
        assert torch.equal(run_kernel(q[rows], pool, index[rows], sinks, scale), full[rows]), f"rows {rows.tolist()}"
    unused = ~referenced(index, p)
    other = torch.where(unused.unsqueeze(-1), torch.randn(p, d).to(dtype) * 100, pool)
    longer = torch.cat([pool, torch.full((6, d), float("nan"), dtype=dtype)])
    padded = torch.cat([index, torch.full((t, 40), -1, dtype=index.dtype)], dim=1)
    assert torch.equal(run_kernel(q, other, index, sinks, scale), full), "depends on unreferenced pool rows"
    assert torch.equal(run_kernel(q, longer, index, sinks, scale), full), "depends on the pool's length"
    assert torch.equal(run_kernel(q, pool, padded, sinks, scale), full), "depends on trailing masked slots"
    assert torch.equal(run_kernel(q, pool, index.long(), sinks, scale), full), "depends on the index dtype"


def run_path(case, split):
    with poisoned_outputs():  # the split path's workspace is poisoned too: unwritten partials would show
        return sparse_sink_attention(*case, kernels="triton", split=split)


@needs_triton
@given(case=attention_cases(max_t=17), longer=st.sampled_from([0, 64, 97]))
def test_split_keys_equal_fused_bit_for_bit(case, longer):
    """The split-key path (a program per key tile, then the combine) gives the fused kernel's bits, and both
    match the reference; `longer` swaps in rows long enough for several tiles."""
    q, pool, index, sinks, scale = case
    if longer:  # the same (T, H, D, dtype) over rows of several tiles, every pattern
        t, h, d = q.shape
        case = make_case(t, h, d, longer, 50, q.dtype, longer + t, (list(PATTERNS) * t)[:t])
        q, pool, index, sinks, scale = case
    split, fused = run_path(case, True), run_path(case, False)
    assert torch.equal(split, fused), "split-key and fused paths differ"
    assert_close(split, sparse_sink_attention_ref(*case), **tolerance(q.dtype, used_keys(pool, index)),
                 what="split kernel")


@needs_triton
@settings(max_examples=4)
@given(seed=seeds(), dtype=st.sampled_from([torch.float32, torch.float16]))
def test_split_combine_is_batch_invariant(seed, dtype):
    """The combine merges a query's tiles in index order whatever else runs: a query alone through the split
    path equals its row of a fused launch over all queries, of a split launch over a subset, and of a split
    launch whose index rows are padded with masked tiles; the automatic choice follows the grid size."""
    t, h, d, s, p = 7, 5, 33, 100, 40
    patterns = ["valid", "holes", "masked", "dups", "prefix", "range", "holes"]
    q, pool, index, sinks, scale = make_case(t, h, d, s, p, dtype, seed, patterns)
    fused = run_path((q, pool, index, sinks, scale), False)
    padded = torch.cat([index, torch.full((t, 70), -1, dtype=index.dtype)], dim=1)
    assert torch.equal(run_path((q, pool, padded, sinks, scale), True), fused), "depends on trailing masked tiles"
    for rows in ([0], [6], [5, 1, 3]):
        rows = torch.tensor(rows)
        alone = run_path((q[rows], pool, index[rows], sinks, scale), True)
        assert torch.equal(alone, fused[rows]), f"rows {rows.tolist()}"
    cpu = torch.device("cpu")  # 132 SMs assumed: split while T × head blocks ≤ 132 / 16
    assert attention.split_keys(1, 2, 20, cpu) and attention.split_keys(4, 2, 20, cpu)
    assert not attention.split_keys(5, 2, 20, cpu) and not attention.split_keys(64, 2, 20, cpu)
    assert not attention.split_keys(1, 2, 1, torch.device("cpu")), "one tile: nothing to split"


def dense_case(b, t, h, d, s, dtype, seed, expand=False):
    """(q, kv, allowed, sinks, scale); kv rows no query may read are NaN."""
    g = generator(seed)
    q = torch.randn(b, t, h, d, generator=g).to(dtype)
    kv = torch.randn(b, s, d, generator=g)
    allowed = torch.rand(1 if expand else b, t, s, generator=g) < 0.4
    allowed[..., 0, :] = False  # one query sees nothing
    allowed = allowed.expand(b, t, s)
    kv = torch.where(allowed.any(1).unsqueeze(-1), kv, float("nan")).to(dtype)
    return q, kv, allowed, torch.randn(h, generator=g), d ** -0.5


@needs_triton
@given(seed=seeds(), b=st.sampled_from([1, 3]), t=st.sampled_from([1, 4]), s=st.sampled_from([1, 6, 35]),
       dtype=st.sampled_from([torch.float32, torch.float16]), expand=st.booleans())
def test_dense_wrapper(seed, b, t, s, dtype, expand):
    """`sink_attention` through the kernel equals its reference; the dense reference equals the sparse
    reference on the flattened pool (fp32 tolerance: different einsum shapes)."""
    q, kv, allowed, sinks, scale = dense_case(b, t, 5, 12, s, dtype, seed, expand)
    want = sink_attention_ref(q, kv, allowed, sinks, scale)
    assert not want.isnan().any()
    index = torch.where(allowed, torch.arange(b * s, dtype=torch.int32).view(b, 1, s), -1).view(b * t, s)
    sparse = sparse_sink_attention_ref(q.view(b * t, 5, 12), kv.view(b * s, 12), index, sinks, scale)
    assert_close(want, sparse.view(b, t, 5, 12), dtype=torch.float32 if dtype == torch.float32 else dtype,
                 what="dense ref vs sparse ref")
    with poisoned_outputs():
        got = sink_attention(q, kv, allowed, sinks, scale, kernels="triton")
    assert got.shape == q.shape and got.dtype == q.dtype
    assert_close(got, want, **tolerance(dtype, used_keys(kv.view(b * s, 12), index)), what="dense kernel")
    assert torch.equal(got[:, 0], torch.zeros_like(got[:, 0]))


@needs_triton
@given(case=attention_cases(), cuts=st.lists(st.integers(0, 64), min_size=1, max_size=2), strided=st.booleans())
def test_pool_in_parts(case, cuts, strided):
    """A pool given as 2–3 parts (some empty, some strided) reads like their concatenation: the kernel
    bit-identically, the reference too."""
    q, pool, index, sinks, scale = case
    edges = [0] + sorted(min(c, pool.shape[0]) for c in cuts) + [pool.shape[0]]
    parts = [pool[a:b] for a, b in zip(edges, edges[1:])]
    if strided:  # rows with a larger stride than D
        parts = [torch.cat([x, torch.full_like(x, float("nan"))], dim=1)[:, :x.shape[1]] for x in parts]
    assert torch.equal(sparse_sink_attention_ref(q, parts, index, sinks, scale),
                       sparse_sink_attention_ref(q, pool, index, sinks, scale))
    assert torch.equal(run_kernel(q, parts, index, sinks, scale), run_kernel(q, pool, index, sinks, scale))


@needs_triton
def test_layouts_and_validation():
    q, pool, index, sinks, scale = make_case(4, 3, 10, 6, 8, torch.float32, 0, ["valid"] * 4)
    want = sparse_sink_attention_ref(q, pool, index, sinks, scale)
    # Strided views with unit last stride are read in place.
    qs = torch.randn(4, 6, 10)[:, ::2].copy_(q)
    ps = torch.randn(8, 16)[:, :10].copy_(pool)
    xs = torch.full((4, 9), -1, dtype=torch.int32)[:, :6].copy_(index)
    assert_close(sparse_sink_attention(qs, ps, xs, sinks, scale, kernels="triton"), want)
    bad = {
        "q dtype": (q.double(), pool, index, sinks),
        "pool dtype": (q, pool.half(), index, sinks),
        "pool width": (q, pool[:, :9], index, sinks),
        "index dtype": (q, pool, index.short(), sinks),
        "index rows": (q, pool, index[:3], sinks),
        "sinks dtype": (q, pool, index, sinks.half()),
        "sinks shape": (q, pool, index, sinks[:2]),
        "q last stride": (q.transpose(0, 2).contiguous().transpose(0, 2), pool, index, sinks),
        "pool last stride": (q, pool.t().contiguous().t(), index, sinks),
        "index last stride": (q, pool, index.t().contiguous().t(), sinks),
        "q rank": (q[0], pool, index, sinks),
        "no parts": (q, [], index, sinks),
        "four parts": (q, [pool[:2], pool[2:4], pool[4:6], pool[6:]], index, sinks),
        "part dtype": (q, [pool[:4], pool[4:].half()], index, sinks),
        "part width": (q, [pool[:4], pool[4:, :9]], index, sinks),
    }
    for what, args in bad.items():
        with pytest.raises(ValueError):
            sparse_sink_attention(*args, scale, kernels="triton")
            pytest.fail(what)
    with pytest.raises(ValueError):  # [B, T] does not flatten without a copy
        qd = torch.randn(3, 2, 3, 10).transpose(0, 1)
        sink_attention(qd, torch.randn(2, 4, 10), torch.ones(2, 3, 4, dtype=torch.bool), sinks, scale,
                       kernels="triton")
    # Empty launches: no queries, no slots, an empty pool.
    assert sparse_sink_attention(q[:0], pool, index[:0], sinks, scale, kernels="triton").shape == (0, 3, 10)
    empty_pool = sparse_sink_attention(q, pool[:0], index, sinks, scale, kernels="triton")
    assert torch.equal(empty_pool, torch.zeros_like(q))
    assert torch.equal(sparse_sink_attention_ref(q, pool[:0], index, sinks, scale), torch.zeros_like(q))


def test_auto_uses_the_reference_on_cpu_and_under_autograd(monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("kernel launched")

    monkeypatch.setattr(attention, "launch", boom)
    case = make_case(3, 2, 8, 5, 6, torch.float32, 1, ["holes", "valid", "masked"])
    assert torch.equal(sparse_sink_attention(*case), sparse_sink_attention_ref(*case))
    dense = dense_case(2, 3, 2, 8, 5, torch.float32, 1)
    assert torch.equal(sink_attention(*dense), sink_attention_ref(*dense))
    q = case[0].clone().requires_grad_(True)
    assert not _launch.use_triton("auto", q)  # a CUDA input with grad would pick the reference too
    out = sparse_sink_attention(q, *case[1:])  # the reference is differentiable, NaN rows stay out of grads
    out.sum().backward()
    assert torch.isfinite(q.grad).all()
    if _launch.HAS_TRITON:
        with pytest.raises(ValueError, match="forward-only"):
            sparse_sink_attention(q, *case[1:], kernels="triton")


@needs_triton
def test_opcheck():
    """Schema, autograd registration, fake tensors (test_aot_dispatch_dynamic needs a GPU: see _launch.launch)."""
    q, pool, index, sinks, scale = make_case(3, 5, 9, 7, 6, torch.float32, 2, ["holes", "masked", "valid"])
    torch.library.opcheck(torch.ops.dspark.sparse_sink_attention, (q, [pool], index, sinks, scale),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


@pytest.mark.extended
@needs_triton
@settings(max_examples=200)
@given(case=attention_cases(max_t=17), data=st.data())
def test_kernel_matches_reference_extended(case, data):
    q, pool, index, sinks, scale = case
    assert_close(run_kernel(*case), sparse_sink_attention_ref(*case), **tolerance(q.dtype, used_keys(pool, index)))
    # Longer rows (several tiles, with empty tiles to skip) for a subset.
    if data.draw(st.booleans()):
        s = data.draw(st.sampled_from([64, 97, 130]))
        big = make_case(3, 5, 24, s, 50, q.dtype, data.draw(seeds()), ["holes", "prefix", "range"])
        assert_close(run_kernel(*big), sparse_sink_attention_ref(*big),
                     **tolerance(q.dtype, used_keys(big[1], big[2])))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("h", [64, 128])
def test_gpu_v4_shapes(dtype, h):
    """V4-Flash / Pro attention: H = 64 / 128, D = 512, S = 640 (window + entries), 37 queries with every
    index pattern; batch invariance on the GPU; full opcheck."""
    patterns = (list(PATTERNS) * 7)[:37]
    case = make_case(37, h, 512, 640, 3000, dtype, 0, patterns, device="cuda")
    q, pool, index, sinks, scale = case
    got = run_kernel(*case)
    want = sparse_sink_attention_ref(*case)
    assert_close(got, want, **tolerance(dtype, used_keys(pool, index)), min_cosine=0.9999, what="kernel")
    for rows in ([5], [36], list(range(10, 17))):
        rows = torch.tensor(rows, device="cuda")
        assert torch.equal(run_kernel(q[rows], pool, index[rows], sinks, scale), got[rows])
    padded = torch.cat([index, torch.full((37, 64), -1, dtype=index.dtype, device="cuda")], dim=1)
    assert torch.equal(run_kernel(q, pool, padded, sinks, scale), got)
    assert torch.equal(run_path(case, True), got) and torch.equal(run_path(case, False), got), "split vs fused"
    assert torch.equal(run_path((q[:1], pool, index[:1], sinks, scale), None), got[:1]), "T = 1 (split) vs T = 37"
    dense = [x.to("cuda") if isinstance(x, torch.Tensor) else x for x in dense_case(2, 9, h, 512, 300, dtype, 0)]
    assert_close(sink_attention(*dense), sink_attention_ref(*dense),
                 **tolerance(dtype, dense[1][dense[2].any(1)]), what="dense")
    torch.library.opcheck(torch.ops.dspark.sparse_sink_attention, (q[:3], [pool], index[:3], sinks, scale))
