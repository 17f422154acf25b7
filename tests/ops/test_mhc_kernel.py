"""Triton mHC kernels (`hc_weights`, `hc_weights_collapse`, `hc_collapse`, `hc_expand`, `hc_head`) against
the references (fp32 tolerance: different summation order), plus batch invariance (bit-identical per
token whatever the batch) and fused == unfused (bit-identical)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, strategies as st

from dspark.ops import _launch, mhc
from dspark.ops.mhc import (hc_collapse, hc_collapse_ref, hc_expand, hc_expand_ref, hc_head, hc_head_ref, hc_weights,
                            hc_weights_collapse, hc_weights_ref)
from tests.compare import assert_close
from tests.helpers.kernels import poisoned_outputs
from tests.strategies import generator, seeds

needs_triton = pytest.mark.skipif(not _launch.HAS_TRITON, reason="needs triton")
HC_EPS, RMS_EPS = 1e-6, 1e-6


def make_case(lead, n, d, dtype, seed, scale=1.0, device="cpu"):
    g = generator(seed)
    streams = (torch.randn(*lead, n, d, generator=g) * scale).to(dtype)
    fn = torch.randn((2 + n) * n, n * d, generator=g) * (0.5 / (n * d) ** 0.5)
    base = torch.randn((2 + n) * n, generator=g) * 0.5
    hc_scale = torch.rand(3, generator=g) + 0.5
    head = (torch.randn(n, n * d, generator=g) * (0.5 / (n * d) ** 0.5), torch.randn(n, generator=g) * 0.5,
            torch.rand(1, generator=g) + 0.5)
    y = (torch.randn(*lead, d, generator=g) * scale).to(dtype)
    move = lambda t: t.to(device)  # noqa: E731
    return (move(streams), move(fn), move(base), move(hc_scale), tuple(map(move, head)), move(y))


@st.composite
def mhc_cases(draw, dtypes=(torch.float32, torch.float16)):
    lead = draw(st.sampled_from([(1,), (2,), (5,), (17,), (2, 3), (3, 7)]))  # 17, 21 tokens cross BLOCK_T = 16
    n = draw(st.sampled_from([1, 2, 3, 4]))
    d = draw(st.sampled_from([1, 7, 33, 64, 65]))
    dtype = draw(st.sampled_from(dtypes))
    iters = draw(st.sampled_from([1, 2, 20]))
    scale = draw(st.sampled_from([0.1, 1.0, 10.0]))
    return make_case(lead, n, d, dtype, draw(seeds()), scale), iters


def check_against_ref(case, iters, wtol=None):
    (x, fn, base, scale, head, y) = case
    with poisoned_outputs():
        pre, post, comb = hc_weights(x, fn, base, scale, iters, HC_EPS, RMS_EPS, kernels="triton")
        fused = hc_weights_collapse(x, fn, base, scale, iters, HC_EPS, RMS_EPS, kernels="triton")
        collapsed = hc_collapse(pre, x, kernels="triton")
        expanded = hc_expand(post, comb, y, x, kernels="triton")
        headed = hc_head(x, *head, HC_EPS, RMS_EPS, kernels="triton")
    want = hc_weights_ref(x, fn, base, scale, iters, HC_EPS, RMS_EPS)
    wtol = wtol or {}
    for name, got, ref in zip(("pre", "post", "comb"), (pre, post, comb), want):
        assert got.dtype == torch.float32
        assert_close(got, ref, what=name, **wtol)
    # Fused and unfused kernels share their code paths: bit-identical.
    for name, a, b in zip(("pre", "post", "comb", "collapse"), fused, (pre, post, comb, collapsed)):
        assert torch.equal(a, b), f"fused {name} differs from the unfused kernels"
    # Outputs in the streams' dtype: the fp32 results may straddle one rounding boundary.
    assert_close(collapsed, hc_collapse_ref(pre, x), dtype=x.dtype, what="collapse")
    assert_close(expanded, hc_expand_ref(post, comb, y, x), dtype=x.dtype, what="expand")
    assert_close(headed, hc_head_ref(x, *head, HC_EPS, RMS_EPS), dtype=x.dtype, what="head")
    assert collapsed.dtype == expanded.dtype == headed.dtype == x.dtype
    return pre, post, comb, collapsed, expanded, headed


@needs_triton
@given(case=mhc_cases())
def test_mhc_kernels_match_references(case):
    check_against_ref(*case)


@needs_triton
@given(seed=seeds(), n=st.sampled_from([1, 3, 4]), d=st.sampled_from([7, 64]))
def test_batch_invariance(seed, n, d):
    """Each token's outputs are bit-identical computed alone, in a batch of 21 (two BLOCK_T tiles) and in a
    batch of 5: no reduction depends on how many tokens are in flight."""
    x, fn, base, scale, head, y = make_case((21,), n, d, torch.float32, seed)

    def run(idx):
        w = hc_weights_collapse(x[idx], fn, base, scale, 20, HC_EPS, RMS_EPS, kernels="triton")
        return (*w, hc_expand(w[1], w[2], y[idx], x[idx], kernels="triton"),
                hc_head(x[idx], *head, HC_EPS, RMS_EPS, kernels="triton"))

    full = run(slice(None))
    for idx in ([7], [20], list(range(9, 14))):
        part = run(torch.tensor(idx))
        for i, (a, b) in enumerate(zip(part, full)):
            assert torch.equal(a, b[idx]), f"output {i} for tokens {idx} depends on the batch"


@needs_triton
def test_layouts_views_and_validation():
    x, fn, base, scale, head, y = make_case((6,), 4, 33, torch.float32, 0)
    big = torch.cat([x, x + 1])  # [12, N, D]
    xs = big[::2]  # leading stride 2·N·D: flattens without a copy
    want = hc_weights_ref(xs, fn, base, scale, 20, HC_EPS, RMS_EPS)
    for a, b in zip(hc_weights(xs, fn, base, scale, 20, HC_EPS, RMS_EPS, kernels="triton"), want):
        assert_close(a, b)
    ys = torch.randn(12, 33)[::2]
    assert_close(hc_expand(want[1], want[2], ys, xs, kernels="triton"), hc_expand_ref(want[1], want[2], ys, xs))
    with pytest.raises(ValueError):  # each token's [N, D] block must be contiguous
        hc_weights(x.transpose(-1, -2).contiguous().transpose(-1, -2), fn, base, scale, 20, HC_EPS, RMS_EPS,
                   kernels="triton")
    with pytest.raises(ValueError):  # fp32 parameters only: no silent upcast copies
        hc_weights(x, fn.half(), base, scale, 20, HC_EPS, RMS_EPS, kernels="triton")
    with pytest.raises(ValueError):
        hc_weights(x, fn[:, :-1], base, scale, 20, HC_EPS, RMS_EPS, kernels="triton")
    with pytest.raises(ValueError):
        hc_expand(want[1], want[2].transpose(-1, -2), y, x, kernels="triton")
    with pytest.raises(ValueError):
        hc_collapse(want[0][:, :3], x, kernels="triton")
    empty = hc_weights_collapse(x[:0], fn, base, scale, 20, HC_EPS, RMS_EPS, kernels="triton")
    assert [t.shape[0] for t in empty] == [0, 0, 0, 0]


def test_auto_uses_the_reference_on_cpu_and_under_autograd(monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("kernel launched")

    monkeypatch.setattr(mhc, "launch", boom)
    x, fn, base, scale, head, y = make_case((3,), 4, 8, torch.float32, 1)
    for a, b in zip(hc_weights(x, fn, base, scale, 20, HC_EPS, RMS_EPS),
                    hc_weights_ref(x, fn, base, scale, 20, HC_EPS, RMS_EPS)):
        assert torch.equal(a, b)
    assert torch.equal(hc_head(x, *head, HC_EPS, RMS_EPS), hc_head_ref(x, *head, HC_EPS, RMS_EPS))
    fn.requires_grad_(True)
    assert not _launch.use_triton("auto", x, fn)  # a CUDA input with grad would pick the reference too
    if _launch.HAS_TRITON:
        with pytest.raises(ValueError, match="forward-only"):
            hc_weights(x, fn, base, scale, 20, HC_EPS, RMS_EPS, kernels="triton")


@needs_triton
@pytest.mark.parametrize("op", ["hc_weights", "hc_weights_collapse", "hc_collapse", "hc_expand", "hc_head"])
def test_opcheck(op):
    """Schema, autograd registration, fake tensors (test_aot_dispatch_dynamic needs a GPU: see _launch.launch)."""
    x, fn, base, scale, head, y = make_case((2, 3), 4, 9, torch.float32, 2)
    pre, post, comb = hc_weights_ref(x, fn, base, scale, 3, HC_EPS, RMS_EPS)
    args = {"hc_weights": (x, fn, base, scale, 3, HC_EPS, RMS_EPS),
            "hc_weights_collapse": (x, fn, base, scale, 3, HC_EPS, RMS_EPS),
            "hc_collapse": (pre, x), "hc_expand": (post, comb, y, x), "hc_head": (x, *head, HC_EPS, RMS_EPS)}[op]
    torch.library.opcheck(getattr(torch.ops.dspark, op), args,
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_v4_shapes(dtype):
    """V4-Flash mHC: N = 4, D = 4096, 37 tokens; batch invariance on the GPU; full opcheck."""
    case = make_case((37,), 4, 4096, dtype, 0, device="cuda")
    # NOTE: 16384-term projections summed in another order than cuBLAS: widen the fp32 weights' rtol.
    out = check_against_ref(case, 20, wtol=dict(rtol=1e-5, atol=1e-5))
    x, fn, base, scale, head, y = case
    alone = hc_weights_collapse(x[5:6], fn, base, scale, 20, HC_EPS, RMS_EPS)
    for a, b in zip(alone, out[:4]):
        assert torch.equal(a, b[5:6])
    torch.library.opcheck(torch.ops.dspark.hc_weights_collapse, (x[:3], fn, base, scale, 20, HC_EPS, RMS_EPS))
    torch.library.opcheck(torch.ops.dspark.hc_expand, (out[1][:3], out[2][:3], y[:3], x[:3]))
