"""The shared selection primitives (ops/_select.py) on their own, through tiny test kernels (interpreter on CPU):
the order key is exact and monotone (ties, ±0.0, ±inf, subnormals, NaN of either sign), `kth_key` equals a
sort-based reference, `argmax_lowest` and `topk_lowest_index` break ties toward the lowest index."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, strategies as st

from dspark.ops import _launch
from dspark.ops._launch import tl, triton
from dspark.ops._select import NCAND, argmax_lowest, kth_key, order_key, topk_lowest_index
from tests.helpers.kernels import poisoned_outputs
from tests.strategies import generator, seeds

needs_triton = pytest.mark.skipif(not _launch.HAS_TRITON, reason="needs triton")
BLOCK = 16  # small tiles, so rows of up to 70 values span several
NEG_NAN = torch.tensor([-4194304], dtype=torch.int32).view(torch.float32)  # bits 0xFFC00000: a NaN with the sign bit


@triton.jit
def _keys_kernel(x_ptr, out_ptr, N, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < N
    tl.store(out_ptr + offs, order_key(tl.load(x_ptr + offs, mask=ok, other=0.0)), mask=ok)


@triton.jit
def _kth_key_kernel(x_ptr, n_sel_ptr, out_ptr, N, BLOCK: tl.constexpr, NCAND: tl.constexpr):
    """Row r: its min / max key bracket the search, as the indexer's select does → (κ, above) at out[r]."""
    r = tl.program_id(0).to(tl.int64)
    row = x_ptr + r * N
    kmin = tl.full([], 2147483647, tl.int64)
    kmax = tl.full([], -2147483648, tl.int64)
    for s0 in range(0, N, BLOCK):
        offs = s0 + tl.arange(0, BLOCK)
        ok = offs < N
        key = order_key(tl.load(row + offs, mask=ok, other=0.0))
        kmin = tl.minimum(kmin, tl.min(tl.where(ok, key, 2147483647), axis=0))
        kmax = tl.maximum(kmax, tl.max(tl.where(ok, key, -2147483648), axis=0))
    kappa, above = kth_key(row, N, tl.load(n_sel_ptr + r), kmin, kmax + 1, BLOCK, NCAND)
    tl.store(out_ptr + 2 * r, kappa)
    tl.store(out_ptr + 2 * r + 1, above)


@triton.jit
def _argmax_kernel(x_ptr, max_ptr, arg_ptr, R, C, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """[R, C] int64 → per row the max and its lowest column (axis 1), and the same along axis 0 of the
    transposed view, through `argmax_lowest`."""
    r = tl.arange(0, BLOCK_R)
    c = tl.arange(0, BLOCK_C)
    ok = (r < R)[:, None] & (c < C)[None, :]
    x = tl.load(x_ptr + r[:, None] * C + c[None, :], mask=ok, other=-2147483648)
    m, arg = argmax_lowest(x, c[None, :], BLOCK_C, 1)
    tl.store(max_ptr + r, m, mask=r < R)
    tl.store(arg_ptr + r, arg, mask=r < R)
    mt, argt = argmax_lowest(tl.trans(x), c[:, None], BLOCK_C, 0)  # the same rows, reduced along axis 0
    tl.store(max_ptr + R + r, mt, mask=r < R)
    tl.store(arg_ptr + R + r, argt, mask=r < R)


def keys(x: torch.Tensor) -> torch.Tensor:
    x = x.contiguous().float()
    with poisoned_outputs():
        out = torch.empty(x.shape, dtype=torch.long)
    _keys_kernel[(triton.cdiv(x.numel(), BLOCK),)](x, out, x.numel(), BLOCK=BLOCK)
    return out


def sorted_floats() -> torch.Tensor:
    """Distinct fp32 values in increasing order: −inf, −max, normals, the subnormal edges, ±0 (as +0), +inf."""
    tiny, sub = torch.finfo(torch.float32).tiny, 2.0 ** -149
    pos = [sub, 2 * sub, tiny - sub, tiny, 1e-30, 0.5, 1.0, 1.0 + 2 ** -23, 3.0, 1e30, torch.finfo(torch.float32).max]
    return torch.tensor([-math.inf] + [-v for v in reversed(pos)] + [0.0] + pos + [math.inf])


def mixed_row(g: torch.Generator, n: int, kind: str) -> torch.Tensor:
    if kind == "dense":
        return torch.randn(n, generator=g) * 10
    if kind == "ties":
        return torch.randint(-2, 3, (n,), generator=g).float()
    if kind == "zeros":
        return torch.where(torch.rand(n, generator=g) < 0.5, -0.0, 0.0)
    row = torch.randn(n, generator=g)  # specials sprinkled in
    pick = torch.randint(0, 6, (n,), generator=g)
    specials = torch.cat([torch.tensor([math.inf, -math.inf, math.nan, -0.0, 0.0]), NEG_NAN])
    return torch.where(torch.rand(n, generator=g) < 0.4, specials[pick], row)


@needs_triton
def test_order_key_is_exact_at_the_edges():
    x = sorted_floats()
    k = keys(x)
    assert bool((k[1:] > k[:-1]).all()), "keys must increase with the float"
    assert int(k[0]) == -2139095041 and int(k[-1]) == 2139095040  # ∓inf
    assert keys(torch.tensor([-0.0, 0.0])).tolist() == [0, 0]
    nans = torch.cat([torch.tensor([math.nan]), NEG_NAN])
    assert keys(nans).tolist() == [2 ** 31 - 1] * 2  # NaN of either sign on top
    # Adjacent floats get adjacent keys: the key is the float's rank, exactly (−0.0 shares +0.0's).
    up = torch.nextafter(x[1:-1], torch.full_like(x[1:-1], math.inf))
    assert torch.equal(keys(up) - keys(x[1:-1]), torch.where(x[1:-1] == -2.0 ** -149, 2, 1))


@needs_triton
@given(seed=seeds(), n=st.sampled_from([1, 2, 17, 70]), kind=st.sampled_from(["dense", "ties", "zeros", "special"]))
def test_order_key_orders_as_torch_sorts(seed, n, kind):
    """Key order is torch's descending stable sort order (NaN first, −0.0 = +0.0), ties included."""
    x = mixed_row(generator(seed), n, kind)
    k = keys(x)
    assert torch.equal(torch.sort(k, descending=True, stable=True).indices,
                       torch.sort(x, descending=True, stable=True).indices)
    nan = torch.isnan(x)
    equal = (x[:, None] == x[None, :]) | (nan[:, None] & nan[None, :])
    assert torch.equal(k[:, None] == k[None, :], equal), "equal keys iff equal floats (all NaN equal)"


@needs_triton
@given(seed=seeds(), n=st.sampled_from([1, 5, 16, 33, 70]), rows=st.integers(1, 4),
       kind=st.sampled_from(["dense", "ties", "zeros", "special"]), data=st.data())
def test_kth_key_equals_a_sort(seed, n, rows, kind, data):
    g = generator(seed)
    x = torch.stack([mixed_row(g, n, kind) for _ in range(rows)])
    n_sel = torch.tensor([data.draw(st.integers(1, n)) for _ in range(rows)])
    with poisoned_outputs():
        out = torch.empty(rows, 2, dtype=torch.long)
    _kth_key_kernel[(rows,)](x, n_sel, out, n, BLOCK=BLOCK, NCAND=NCAND)
    for r in range(rows):
        kth = torch.sort(x[r], descending=True, stable=True).values[int(n_sel[r]) - 1]  # NaN sorts first
        nan = torch.isnan(x[r])
        above = 0 if bool(torch.isnan(kth)) else int((x[r] > kth).sum() + nan.sum())
        assert int(out[r, 0]) == int(keys(kth[None])[0]), f"row {r}: k-th key"
        assert int(out[r, 1]) == above, f"row {r}: count above the k-th key"


@needs_triton
@given(seed=seeds(), rows=st.integers(1, 5), cols=st.integers(1, 19))
def test_argmax_lowest_takes_the_first_maximum(seed, rows, cols):
    x = torch.randint(-3, 3, (rows, cols), generator=generator(seed))  # many ties
    block_r, block_c = max(16, triton.next_power_of_2(rows)), max(16, triton.next_power_of_2(cols))
    with poisoned_outputs():
        m, arg = torch.empty(2 * rows, dtype=torch.long), torch.empty(2 * rows, dtype=torch.int32)
    _argmax_kernel[(1,)](x, m, arg, rows, cols, BLOCK_R=block_r, BLOCK_C=block_c)
    want = topk_lowest_index(x, 1)[:, 0]
    assert torch.equal(arg.long(), torch.cat([want, want]))
    assert torch.equal(m, torch.cat([x.max(-1).values] * 2))


@given(seed=seeds(), n=st.integers(1, 30), k=st.integers(0, 30), kind=st.sampled_from(["ties", "zeros", "special"]))
def test_topk_lowest_index_breaks_ties_by_index(seed, n, k, kind):
    """The reference rule, brute force: NaN first, then larger values; equal values (−0.0 = +0.0) by index."""
    x = mixed_row(generator(seed), n, kind)
    vals = x.tolist()
    want = sorted(range(n), key=lambda i: (not math.isnan(vals[i]), -vals[i] if not math.isnan(vals[i]) else 0, i))
    assert topk_lowest_index(x, k).tolist() == want[:k]
