"""The compressors' window pooling: the `compress_windows` Triton kernel against its reference, the reference
against a per-(window, channel) loop in fp64, batch invariance, validation and the
`dspark::compress_windows` registration.

Tolerance: the output is fp32 whatever kv's dtype (16-bit kv upcasts exactly), so the fp32 entry of the
table applies, with atol widened to 8 fp32 ulps of max|kv|: the kernel's exp and its slot sums differ
from torch's by a few ulps, and the pooled value is a convex combination of the kv values, so its
error is bounded by a few ulps of max|kv| rather than of the (possibly cancelling) result.
Outputs are poisoned before every launch (tests/ops/test_sampling_kernel.poisoned_outputs).
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from dspark.ops import _launch, compressor
from dspark.ops.compressor import compress_windows, compress_windows_ref
from tests.compare import assert_close
from tests.helpers.kernels import poisoned_outputs
from tests.strategies import generator, seeds

needs_triton = pytest.mark.skipif(not _launch.HAS_TRITON, reason="needs triton")
EMPTY_KINDS = ("none", "first_half", "random", "all_but_one")
EPS32 = torch.finfo(torch.float32).eps


def make_case(lead, p, c, kv_dtype, gate_dtype, seed, *, empty="random", gate_scale=1.0, kv_scale=1.0,
              device="cpu"):
    """(kv [*lead, P, C], gate [*lead, P, C]); empty slots have gate −inf and kv 0:
    none; the first half of the slots (CSA's window 0, whose previous window does not exist); random slots
    per channel; every slot but one random one per channel. Every channel keeps a finite slot."""
    g = generator(seed)
    kv = torch.randn(*lead, p, c, generator=g) * kv_scale
    gate = torch.randn(*lead, p, c, generator=g) * gate_scale
    slot = torch.arange(p).view(p, 1)
    if empty == "first_half":
        hole = (slot < p // 2).expand(p, c)
    elif empty == "random":
        hole = torch.rand(*lead, p, c, generator=g) < 0.4
    elif empty == "all_but_one":
        keep = torch.randint(0, p, (*lead, 1, c), generator=g)
        hole = slot != keep
    else:
        hole = torch.zeros(p, c, dtype=torch.bool)
    hole = hole & ~(hole.all(dim=-2, keepdim=True) & (slot == p - 1))  # never a channel without a finite slot
    gate = torch.where(hole, -math.inf, gate)
    kv = torch.where(hole, 0.0, kv)
    return kv.to(device, kv_dtype), gate.to(device, gate_dtype)


@st.composite
def pooling_cases(draw, max_p=128, dtypes=(torch.float32, torch.float16)):
    lead = draw(st.sampled_from([(), (1,), (3,), (2, 5), (1, 7)]))
    p = draw(st.sampled_from([n for n in (1, 2, 3, 8, 13, 32, 128) if n <= max_p]))  # CSA 2m = 8, HCA m = 128
    c = draw(st.sampled_from([1, 7, 16, 33, 129]))  # 129 crosses BLOCK_C = 128 (P ≤ 32)
    return make_case(lead, p, c, draw(st.sampled_from(dtypes)), draw(st.sampled_from(dtypes)), draw(seeds()),
                     empty=draw(st.sampled_from(EMPTY_KINDS)), gate_scale=draw(st.sampled_from([0.1, 1.0, 30.0])),
                     kv_scale=draw(st.sampled_from([1.0, 100.0])))


def naive_loop(kv: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """The docstring's formula one window and channel at a time, in fp64 → [..., C] fp64."""
    p, c = kv.shape[-2:]
    kv2, gate2 = kv.double().reshape(-1, p, c), gate.double().reshape(-1, p, c)
    out = torch.zeros(kv2.shape[0], c, dtype=torch.float64)
    for n in range(kv2.shape[0]):
        for ch in range(c):
            g = gate2[n, :, ch].tolist()
            top = max(g)
            e = [math.exp(x - top) for x in g]
            out[n, ch] = sum(ei / sum(e) * float(kv2[n, s, ch]) for s, ei in enumerate(e))
    return out.view(*kv.shape[:-2], c)


def atol(kv: torch.Tensor) -> float:
    """8 fp32 ulps of max|kv| (module docstring)."""
    return max(1e-5, 8 * EPS32 * float(kv.float().abs().max())) if kv.numel() else 1e-5


def run_kernel(kv, gate):
    with poisoned_outputs():
        return compress_windows(kv, gate, kernels="triton")


@given(case=pooling_cases(max_p=13))
def test_reference_matches_naive_loop(case):
    kv, _ = case
    assert_close(compress_windows_ref(*case), naive_loop(*case).float(), atol=atol(kv), what="reference vs loop")


@needs_triton
@given(case=pooling_cases())
def test_kernel_matches_reference(case):
    kv, gate = case
    got = run_kernel(kv, gate)
    assert got.dtype == torch.float32 and got.shape == kv.shape[:-2] + kv.shape[-1:] and got.is_contiguous()
    assert_close(got, compress_windows_ref(kv, gate), atol=atol(kv), what="kernel")


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_single_finite_slot_copies_its_kv(dtype):
    """A channel with one finite slot takes that slot's kv exactly (weight exp(0) / exp(0) = 1)."""
    kv, gate = make_case((4,), 8, 9, dtype, torch.float32, 3, empty="all_but_one", gate_scale=30.0)
    got = run_kernel(kv, gate)
    want = torch.where(gate > -math.inf, kv.float(), 0.0).sum(-2)
    assert torch.equal(got, want)


@needs_triton
@settings(max_examples=4)
@given(seed=seeds(), dtype=st.sampled_from([torch.float32, torch.float16]), p=st.sampled_from([8, 128]))
def test_batch_invariance(seed, dtype, p):
    """A window's entry is bit-identical pooled alone, among other windows, or in another leading shape."""
    kv, gate = make_case((3, 5), p, 33, dtype, torch.float32, seed)
    full = run_kernel(kv, gate)
    assert torch.equal(run_kernel(kv[1:2, 3:4], gate[1:2, 3:4]), full[1:2, 3:4])
    assert torch.equal(run_kernel(kv[2, [4, 0]], gate[2, [4, 0]]), full[2, [4, 0]])
    assert torch.equal(run_kernel(kv.flatten(0, 1), gate.flatten(0, 1)), full.flatten(0, 1))


@needs_triton
def test_layouts_and_validation():
    kv, gate = make_case((2, 3), 8, 10, torch.float32, torch.float32, 0)
    want = compress_windows_ref(kv, gate)
    # Strided views with unit last stride are read in place: a channel slice of a wider projection (the
    # model's CSA series split) and windows every other row.
    kvs = torch.randn(2, 3, 8, 20)[..., 5:15].copy_(kv)
    gs = torch.randn(2, 6, 8, 10)[:, ::2].copy_(gate)
    assert_close(compress_windows(kvs, gs, kernels="triton"), want, atol=atol(kv))
    bad = {
        "kv dtype": (kv.double(), gate),
        "gate dtype": (kv, gate.double()),
        "shape": (kv, gate[..., :9]),
        "rank": (kv[0, 0, 0], gate[0, 0, 0]),
        "kv last stride": (kv.transpose(-1, -2).contiguous().transpose(-1, -2), gate),
        "gate last stride": (kv, gate.transpose(-1, -2).contiguous().transpose(-1, -2)),
        "no slots": (kv[..., :0, :], gate[..., :0, :]),
        "leading dims": (torch.randn(3, 2, 8, 10).transpose(0, 1), gate),
    }
    for what, args in bad.items():
        with pytest.raises(ValueError):
            compress_windows(*args, kernels="triton")
            pytest.fail(what)
    # Empty launches: no windows, no channels.
    assert compress_windows(kv[:0], gate[:0], kernels="triton").shape == (0, 3, 10)
    assert compress_windows(kv[..., :0], gate[..., :0], kernels="triton").shape == (2, 3, 0)


def test_auto_uses_the_reference_on_cpu_and_under_autograd(monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("kernel launched")

    monkeypatch.setattr(compressor, "launch", boom)
    kv, gate = make_case((3,), 8, 6, torch.float32, torch.float32, 1, empty="first_half")
    assert torch.equal(compress_windows(kv, gate), compress_windows_ref(kv, gate))
    kv.requires_grad_(True)
    assert not _launch.use_triton("auto", kv)  # a CUDA input with grad would pick the reference too
    compress_windows(kv, gate).sum().backward()
    assert torch.isfinite(kv.grad).all()
    if _launch.HAS_TRITON:
        with pytest.raises(ValueError, match="forward-only"):
            compress_windows(kv, gate, kernels="triton")


@needs_triton
def test_opcheck():
    """Schema, autograd registration, fake tensors (test_aot_dispatch_dynamic needs a GPU: see _launch.launch)."""
    kv, gate = make_case((2, 3), 8, 9, torch.float32, torch.float32, 2)
    torch.library.opcheck(torch.ops.dspark.compress_windows, (kv, gate),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


@pytest.mark.extended
@needs_triton
@settings(max_examples=200)
@given(case=pooling_cases(), data=st.data())
def test_kernel_matches_reference_extended(case, data):
    kv, gate = case
    assert_close(run_kernel(kv, gate), compress_windows_ref(kv, gate), atol=atol(kv))
    if data.draw(st.booleans()):  # V4 widths: CSA (P = 8) and HCA (P = 128) windows of 512 channels
        big = make_case((5,), data.draw(st.sampled_from([8, 128, 300])), 512, kv.dtype, torch.float32,
                        data.draw(seeds()), empty=data.draw(st.sampled_from(EMPTY_KINDS)))
        assert_close(run_kernel(*big), compress_windows_ref(*big), atol=atol(big[0]))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("p", [8, 128])
def test_gpu_v4_shapes(dtype, p):
    """V4 compressors: 2 × 37 windows of 512 channels (CSA P = 8 with an empty first half, HCA P = 128);
    batch invariance on the GPU; full opcheck (bf16, P = 8)."""
    kv, gate = make_case((2, 37), p, 512, dtype, torch.float32, 0, empty="first_half" if p == 8 else "none",
                         device="cuda")
    got = run_kernel(kv, gate)
    assert_close(got, compress_windows_ref(kv, gate), atol=atol(kv), min_cosine=0.99999)
    assert torch.equal(run_kernel(kv[1, 5:9], gate[1, 5:9]), got[1, 5:9])
    if dtype == torch.bfloat16 and p == 8:  # the full opcheck compiles through torch.compile: once is enough
        torch.library.opcheck(torch.ops.dspark.compress_windows, (kv[1, :3], gate[1, :3]))
