"""FP8 block-scaled linear and grouped FP4 experts: the kernels (raw bytes decoded in-kernel, so they run in
Triton's CPU interpreter) against their references and `dspark.checkpoint.quant`'s dequantisers: decoding
bit-exact through one-hot inputs, random GEMMs within the fp32 summation-order bound, padding and empty
experts, refusals. bf16 activations and CUDA float8 tensors are GPU-only."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, strategies as st

from dspark.checkpoint.quant import dequantize_fp4, dequantize_fp8, quantize_fp4, quantize_fp8
from dspark.ops import _launch
from dspark.ops import fp4_experts, fp4_experts_ref, fp8_linear, fp8_linear_ref
from dspark.ops.quant_gemm import decode_e2m1_ref, group_tiles
from tests.compare import assert_close
from tests.helpers.kernels import assert_equal, poisoned_outputs
from tests.strategies import generator, seeds, sizes

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
E4M3_FINITE = torch.tensor([b for b in range(256) if b & 0x7F != 0x7F], dtype=torch.uint8)  # 0x7F / 0xFF: NaN


def as_scale(u: torch.Tensor, kind: str) -> torch.Tensor:
    """Raw UE8M0 exponents as the given scale dtype."""
    return {"e8m0": u.view(torch.float8_e8m0fnu), "uint8": u, "fp32": u.view(torch.float8_e8m0fnu).float()}[kind]


def summation_bound(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """|error| bound of an fp32 dot product in any order: K · 2^−23 · Σ|x||w| (per output element)."""
    return x.shape[1] * 2.0 ** -23 * (x.abs().double() @ w.abs().double().t())


def assert_gemm_close(got: torch.Tensor, want: torch.Tensor, x: torch.Tensor, w: torch.Tensor, what: str) -> None:
    # fp32 summation order differs between tl.dot and torch's matmul; bound it instead of a flat rtol.
    err = (got.double() - want.double()).abs()
    bound = summation_bound(x.float(), w)
    assert torch.isfinite(got).all() and bool((err <= bound + 1e-30).all()), f"{what}: {float((err - bound).max())}"


@pytest.mark.parametrize("scale_kind", ["e8m0", "uint8", "fp32"])
@pytest.mark.parametrize("w_kind", ["float8", "uint8"])
def test_fp8_decode_is_bit_exact(scale_kind, w_kind):
    """One-hot rows of x pick single weights: y = dequant(w)ᵀ exactly, for every finite e4m3 byte."""
    k, n = E4M3_FINITE.numel(), 5
    raw = torch.stack([E4M3_FINITE.roll(3 * i) for i in range(n)]).to(DEVICE)  # [N, K] every byte in every row
    w = raw.view(torch.float8_e4m3fn) if w_kind == "float8" else raw
    u = torch.tensor([[100, 127, 140]], dtype=torch.uint8, device=DEVICE)  # [1, ceil(254/96)] blocks of 96
    scale = as_scale(u, scale_kind)
    x = torch.eye(k, device=DEVICE)
    with poisoned_outputs():
        got = fp8_linear(x, w, scale, (96, 96), kernels="triton")
    want = dequantize_fp8(raw.view(torch.float8_e4m3fn), u.view(torch.float8_e8m0fnu), (96, 96)).t()
    assert_equal(got, want, "kernel vs checkpoint.quant")
    assert_equal(fp8_linear_ref(x, w, scale, (96, 96)), want, "reference vs checkpoint.quant")


def test_fp8_nan_weights_and_scales_reach_their_outputs():
    raw = torch.full((4, 40), 0x38, dtype=torch.uint8, device=DEVICE)  # 1.0
    raw[1, 7] = 0x7F  # NaN weight
    u = torch.tensor([[127], [127]], dtype=torch.uint8, device=DEVICE)
    u[1, 0] = 255  # NaN scale: rows 2..3 (block of 2 rows)
    x = torch.randn(3, 40, device=DEVICE)
    got = fp8_linear(x, raw, u, (2, 64), kernels="triton")
    assert_close(got, fp8_linear_ref(x, raw, u, (2, 64)), what="nan positions")
    assert torch.isnan(got[:, 1:]).all() and not torch.isnan(got[:, 0]).any()


@pytest.mark.parametrize("t,n,k,block", [(1, 1, 1, (128, 128)), (5, 130, 257, (128, 128)), (17, 64, 128, (64, 32)),
                                         (3, 7, 301, (5, 7)), (33, 129, 64, (128, 128))])
def test_fp8_linear_matches_reference(t, n, k, block):
    g = torch.Generator().manual_seed(t * 1000 + n + k)
    w = torch.randn(n, k, generator=g) * 3
    q, scale = quantize_fp8(w, block)
    x = (torch.randn(t, k, generator=g) * 2).to(DEVICE)
    q, scale = q.to(DEVICE), scale.to(DEVICE)
    with poisoned_outputs():
        got = fp8_linear(x, q, scale, block, kernels="triton")
    want = fp8_linear_ref(x, q, scale, block)
    assert_gemm_close(got, want, x, dequantize_fp8(q, scale, block), f"[{t}, {n}, {k}] {block}")
    assert_equal(fp8_linear(x, q, scale, block, kernels="ref"), want, "kernels='ref' is the reference")


def fp4_weights(e: int, n: int, k: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    packed, scales = zip(*(quantize_fp4(torch.randn(n, k, generator=g) * 4) for _ in range(e)))
    return torch.stack(packed), torch.stack(scales)


def check_grouped(got, want, x, packed, scale, counts: list[int]) -> None:
    """Each expert's rows within the summation bound of its own weights; padding rows exactly 0."""
    start, rows = 0, x.shape[0]
    for i, cnt in enumerate(counts):
        part = slice(min(start, rows), min(start + cnt, rows))
        w = dequantize_fp4(packed[i], scale[i]).to(x.device)
        assert_gemm_close(got[part], want[part], x[part], w, f"expert {i}")
        start += cnt
    assert_equal(got[min(start, rows):], torch.zeros_like(got[min(start, rows):]), "padding rows")


def test_fp4_decode_is_bit_exact():
    """Every packed byte (both nibbles) in every expert; one-hot rows give dequant(w[e])ᵀ exactly."""
    e, n, k = 2, 3, 512
    packed = torch.stack([torch.arange(256, dtype=torch.uint8).roll(5 * i).repeat(e, 1) for i in range(n)], 1)
    packed = packed.view(torch.int8).contiguous()  # [E, N, K/2]
    u = torch.randint(110, 140, (e, n, k // 32), dtype=torch.uint8)
    x = torch.eye(k).repeat(e, 1)  # expert i's rows: eye(K)
    counts = torch.full((e,), k)
    dev = [t.to(DEVICE) for t in (x, packed, u.view(torch.float8_e8m0fnu), counts)]
    got = fp4_experts(*dev, kernels="triton")
    want = torch.cat([dequantize_fp4(packed[i], u[i].view(torch.float8_e8m0fnu)).t() for i in range(e)])
    assert_equal(got, want.to(DEVICE), "kernel vs checkpoint.quant")
    assert_equal(fp4_experts_ref(*dev), want.to(DEVICE), "reference vs checkpoint.quant")
    unit = torch.full((n, k // 32), 127, dtype=torch.uint8)  # 2^0
    assert_equal(decode_e2m1_ref(packed[0]), dequantize_fp4(packed[0], unit), "decode_e2m1_ref")


@pytest.mark.parametrize("counts,rows", [([3, 0, 17, 1, 20], 45), ([0, 0, 0, 0, 0], 3), ([16, 16, 0, 0, 33], 65),
                                         ([40, 10, 0, 0, 9], 50), ([1], 1)])
def test_fp4_experts_match_reference(counts, rows):
    """Empty experts, tiles ending mid-expert, padding rows past Σ counts (0), and counts past S (clipped)."""
    e, n, k = len(counts), 33, 96
    packed, scale = fp4_weights(e, n, k, seed=rows)
    x = torch.randn(rows, k).to(DEVICE)
    c = torch.tensor(counts, device=DEVICE)
    got = fp4_experts(x, packed.to(DEVICE), scale.to(DEVICE), c, kernels="triton")
    want = fp4_experts_ref(x, packed.to(DEVICE), scale.to(DEVICE), c)
    check_grouped(got, want, x, packed, scale, counts)


@given(t=sizes(40), n=sizes(80), k=sizes(150), bn=st.sampled_from([1, 3, 32, 128]), bk=st.sampled_from([1, 5, 64, 128]),
       seed=seeds())
def test_fp8_linear_any_shape(t, n, k, bn, bk, seed):
    g = generator(seed)
    q, scale = quantize_fp8(torch.randn(n, k, generator=g), (bn, bk), scale_dtype=torch.uint8)
    x = torch.randn(t, k, generator=g).to(DEVICE)
    q, scale = q.to(DEVICE), scale.to(DEVICE)
    with poisoned_outputs():
        got = fp8_linear(x, q, scale, (bn, bk), kernels="triton")
    assert_gemm_close(got, fp8_linear_ref(x, q, scale, (bn, bk)), x, dequantize_fp8(q, scale, (bn, bk)), "fp8")


@given(counts=st.lists(st.integers(0, 20), min_size=1, max_size=5), pad=st.integers(-5, 5), n=sizes(70),
       half_k=sizes(40), seed=seeds())
def test_fp4_experts_any_grouping(counts, pad, n, half_k, seed):
    k = 2 * half_k
    rows = max(1, sum(counts) + pad)
    packed, scale = fp4_weights(len(counts), n, k, seed=seed)
    x = torch.randn(rows, k, generator=generator(seed)).to(DEVICE)
    c = torch.tensor(counts, device=DEVICE)
    got = fp4_experts(x, packed.to(DEVICE), scale.to(DEVICE), c, kernels="triton")
    want = fp4_experts_ref(x, packed.to(DEVICE), scale.to(DEVICE), c)
    check_grouped(got, want, x, packed, scale, counts)


@pytest.mark.skipif(not _launch.HAS_TRITON, reason="needs triton")
def test_opcheck():
    """Schema, autograd registration, fake tensors (test_aot_dispatch_dynamic needs a GPU: see _launch.launch)."""
    q, s = quantize_fp8(torch.randn(9, 20), (4, 8), scale_dtype=torch.uint8)
    # Raw bytes: opcheck's schema test does arithmetic on every input, which float8 tensors lack on CPU.
    torch.library.opcheck(torch.ops.dspark.fp8_linear, (torch.randn(3, 20), q.view(torch.uint8), s, 4, 8),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
    packed, scale = fp4_weights(3, 5, 64)
    torch.library.opcheck(torch.ops.dspark.fp4_experts, (torch.randn(7, 64), packed, scale.view(torch.uint8),
                                                         torch.tensor([2, 0, 4])),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


def test_group_tiles_cover_every_row_once():
    counts = torch.tensor([0, 5, 16, 17, 0, 1])
    expert, row0, rows = group_tiles(counts, 50, block_m=16)
    seen = torch.full((50,), -1)
    for e, r0, r in zip(expert.tolist(), row0.tolist(), rows.tolist()):
        assert 0 <= r <= 16
        assert (seen[r0:r0 + r] == -1).all()
        seen[r0:r0 + r] = e
    assert seen.tolist() == [1] * 5 + [2] * 16 + [3] * 17 + [5] + [-1] * 11


def test_refusals():
    q, s = quantize_fp8(torch.randn(8, 16), (4, 4))
    x = torch.randn(2, 16)
    for bad, msg in [(dict(x=x.half()), "dtype"), (dict(scale=s[:1]), "shape"),
                     (dict(w=q.t().contiguous().t()), "contiguous"), (dict(x=torch.randn(2, 15)), "K=15")]:
        args = dict(x=x, w=q, scale=s) | bad
        with pytest.raises(ValueError, match=msg):
            fp8_linear(args["x"], args["w"], args["scale"], (4, 4), kernels="triton")
    packed, scale = fp4_weights(2, 4, 64)
    with pytest.raises(ValueError, match="counts"):
        fp4_experts(torch.randn(3, 64), packed, scale, torch.tensor([1, 2, 3]), kernels="triton")
    with pytest.raises(ValueError, match="K/2"):
        fp4_experts(torch.randn(3, 32), packed, scale, torch.tensor([1, 2]), kernels="triton")


def test_auto_on_cpu_is_the_reference_and_ops_are_registered():
    q, s = quantize_fp8(torch.randn(8, 16), (4, 4))
    x = torch.randn(2, 16)
    assert_equal(fp8_linear(x.cpu(), q, s, (4, 4)), fp8_linear_ref(x, q, s, (4, 4)), "auto on CPU")
    assert hasattr(torch.ops.dspark, "fp8_linear") and hasattr(torch.ops.dspark, "fp4_experts")


@pytest.mark.gpu
@pytest.mark.parametrize("t", [1, 16, 77])
def test_bf16_activations_and_cuda_float8_weights(t):
    """Real float8_e4m3fn / e8m0 tensors on the GPU with bf16 x: the decoded weights are exact in bf16, so
    only the fp32 summation order separates the kernel from the reference on the same bf16 inputs."""
    w = torch.randn(300, 520) * 2
    q, s = (v.cuda() for v in quantize_fp8(w))
    x = torch.randn(t, 520).cuda().bfloat16()
    got = fp8_linear(x, q, s)
    want = fp8_linear_ref(x, q, s)
    assert_gemm_close(got, want, x, dequantize_fp8(q, s), "fp8 bf16")
    packed, scale = fp4_weights(4, 96, 256)
    c = torch.tensor([t, 0, 3, 1], device="cuda")
    xs = torch.randn(t + 4, 256).cuda().bfloat16()
    got = fp4_experts(xs, packed.cuda(), scale.cuda(), c)
    want = fp4_experts_ref(xs, packed.cuda(), scale.cuda(), c)
    assert_close(got, want, rtol=1e-4, atol=1e-3, min_cosine=0.99999,
                 what="fp4 bf16")  # fp32 summation order over K = 256 on O(50) magnitudes
