"""Grouped MoE experts (Triton, through the interpreter on CPU) against `experts_ref`: random and
degenerate routings (every token to one expert, empty experts, slots routed nowhere, repeated experts),
odd shapes, the device-side tile plan, batch invariance, poisoned intermediates, validation and the
`dspark::moe_experts` registration.

Tolerances: fp32 dots run at IEEE precision, so only the summation order differs from the reference
(atol 1e-4 at these magnitudes). fp16 rounds the SwiGLU output to fp16 before the down GEMM, as the
reference does, but the reference also rounds both GEMMs' outputs to fp16: atol/rtol 1e-2.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, strategies as st

from dspark.ops import _launch
from dspark.ops.moe import _BLOCK_M, expert_tiles, experts, experts_ref
from tests.compare import assert_close
from tests.helpers.kernels import poisoned_outputs
from tests.strategies import generator, routings, seeds

needs_triton = pytest.mark.skipif(not _launch.HAS_TRITON, reason="needs triton")


def make_case(n, e, k, d, i, dtype, seed, routing=None, nowhere=0.0):
    g = generator(seed)
    idx = routing if routing is not None else torch.rand(n, e, generator=g).argsort(-1)[:, :k]
    idx = torch.where(torch.rand(n, k, generator=g) < nowhere, -1, idx)
    x = torch.randn(n, d, generator=g).to(dtype)
    gu = (torch.randn(e, 2 * i, d, generator=g) / d ** 0.5).to(dtype)
    dn = (torch.randn(e, d, i, generator=g) / i ** 0.5).to(dtype)
    w = torch.rand(n, k, generator=g)
    return x, w, idx, gu, dn


def check_against_reference(case, limit=10.0, dtype=torch.float32):
    x, w, idx, gu, dn = case
    with poisoned_outputs():
        got = experts(x, w, idx, gu, dn, limit, kernels="triton")
    ref = experts_ref(x.float(), w, idx, gu.float(), dn.float(), limit)
    assert got.dtype == x.dtype and not got.isnan().any()
    tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=1e-2, rtol=1e-2)
    assert_close(got.float(), ref, what="grouped experts", **tol)


@needs_triton
@given(n=st.sampled_from([1, 2, 3, 7, 17, 40]), e=st.sampled_from([1, 3, 8, 13]), k=st.integers(1, 4),
       d=st.sampled_from([1, 12, 33]), i=st.sampled_from([5, 16, 31]), data=st.data())
def test_grouped_experts_match_the_reference(n, e, k, d, i, data):
    k = min(k, e)
    routing = data.draw(routings(n, e, k))
    case = make_case(n, e, k, d, i, torch.float32, data.draw(seeds()), routing=routing,
                     nowhere=data.draw(st.sampled_from([0.0, 0.3, 1.0])))
    check_against_reference(case)


@needs_triton
def test_fp16_matches_the_reference():
    check_against_reference(make_case(19, 6, 2, 40, 24, torch.float16, 3, nowhere=0.2), dtype=torch.float16)


@needs_triton
def test_clamp_and_repeated_experts():
    """A small limit clamps most gate/up values; hash tables may list one expert twice for a token."""
    x, w, idx, gu, dn = make_case(9, 4, 3, 16, 16, torch.float32, 5)
    x = x * 30
    idx[:, 1] = idx[:, 0]
    check_against_reference((x, w, idx, gu, dn), limit=0.7)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_a_token_result_does_not_depend_on_its_batch(dtype):
    """Bit-identical per token whether it runs alone, first or last among others (fixed BLOCK_M tiles).
    GPU only: the interpreter's tl.dot is a BLAS call whose result for a row can move by an ulp with the
    row's position in the tile; a GPU's MMA accumulates every row of a tile the same way."""
    x, w, idx, gu, dn = (t.cuda() for t in make_case(21, 5, 2, 24, 20, dtype, 7))
    full = experts(x, w, idx, gu, dn, 10.0, kernels="triton")
    for t in (0, 20):
        alone = experts(x[t:t + 1], w[t:t + 1], idx[t:t + 1], gu, dn, 10.0, kernels="triton")
        assert torch.equal(alone[0], full[t])
    tail = experts(x[5:], w[5:], idx[5:], gu, dn, 10.0, kernels="triton")
    assert torch.equal(tail, full[5:])


@given(n=st.integers(0, 50), e=st.integers(1, 12), k=st.integers(1, 4), data=st.data())
def test_tile_plan_covers_every_routed_slot_once(n, e, k, data):
    k = min(k, e)
    idx = data.draw(routings(n, e, k)) if n else torch.empty(0, k, dtype=torch.long)
    idx = torch.where(torch.rand(n, k, generator=generator(data.draw(seeds()))) < 0.2, -1, idx)
    order, tile_expert, row0, rows = expert_tiles(idx, e)
    assert rows.shape[0] == -(-n * k // _BLOCK_M) + min(e, n * k)  # a bound from shapes alone
    assert ((rows >= 0) & (rows <= _BLOCK_M)).all()
    covered = []
    for t in range(rows.shape[0]):
        sl = order[int(row0[t]):int(row0[t]) + int(rows[t])]
        assert (idx.flatten()[sl] == tile_expert[t]).all()  # one expert per tile
        covered += sl.tolist()
    live = (idx.flatten() >= 0).nonzero().flatten().tolist()
    assert sorted(covered) == live  # every routed slot once, padding never


@needs_triton
def test_bad_inputs_raise():
    x, w, idx, gu, dn = make_case(4, 3, 2, 8, 8, torch.float32, 0)
    with pytest.raises(ValueError, match="weights"):
        experts(x, w.double(), idx, gu, dn, 10.0, kernels="triton")
    with pytest.raises(ValueError, match="gate_up"):
        experts(x, w, idx, gu.transpose(1, 2), dn, 10.0, kernels="triton")
    with pytest.raises(ValueError, match="down"):
        experts(x, w, idx, gu, dn[:, :, :4], 10.0, kernels="triton")
    with pytest.raises(ValueError, match="indices"):
        experts(x, w, idx[:3], gu, dn, 10.0, kernels="triton")


@needs_triton
def test_opcheck():
    x, w, idx, gu, dn = make_case(5, 3, 2, 8, 8, torch.float32, 1)
    torch.library.opcheck(torch.ops.dspark.moe_experts.default, (x, w, idx, gu, dn, 10.0),
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_grouped_experts_on_the_gpu(dtype):
    for n, e, k in ((1, 8, 2), (8, 64, 6), (70, 16, 4)):
        x, w, idx, gu, dn = (t.cuda() for t in make_case(n, e, k, 256, 128, dtype, n, nowhere=0.1))
        got = experts(x, w, idx, gu, dn, 10.0)
        ref = experts_ref(x.float(), w, idx, gu.float(), dn.float(), 10.0)
        tol = dict(atol=1e-3, rtol=1e-3) if dtype == torch.float32 else dict(atol=3e-2, rtol=3e-2)
        assert_close(got.float(), ref, what=f"grouped experts {dtype}", **tol)


@needs_triton
@pytest.mark.extended
@given(n=st.integers(1, 300), e=st.integers(1, 40), k=st.integers(1, 8), d=st.integers(1, 96),
       i=st.integers(1, 80), seed=seeds())
def test_grouped_experts_match_the_reference_extended(n, e, k, d, i, seed):
    k = min(k, e)
    check_against_reference(make_case(n, e, k, d, i, torch.float32, seed, nowhere=0.1))
