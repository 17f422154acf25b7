"""Triton sampling kernels (`probs`, `sample`, `sample_logits`) against their references.

Discrete outputs and, by construction (ops/sampling.py "Determinism"), the fp32 probabilities are
bit-identical to the reference; every case compares with `torch.equal` and through `assert_close`
(NaN never passes). On CPU the kernels run under TRITON_INTERPRET=1 (tests/conftest.py).
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from dspark.ops import _launch, sampling
from dspark.ops.sampling import (exp2_fixed, fixed_bits, probs, probs_ref, sample, sample_logits, sample_logits_ref,
                                 sample_ref)
from tests.compare import assert_close
from tests.helpers.kernels import ALMOST_ONE, assert_equal, filter_params, logit_rows, poisoned_outputs
from tests.strategies import generator, probability_rows, seeds

needs_triton = pytest.mark.skipif(not _launch.HAS_TRITON, reason="needs triton")
VOCABS = [1, 7, 129]  # default tier; 1000 / 4099 in the extended tier (the interpreter is slow)


# ---------------------------------------------------------------------------------------------------
# The shared deterministic recipe (reference only; fast).


def test_exp2_fixed_is_accurate_and_monotone():
    z = -torch.linspace(0, 40, 200_001)
    f = fixed_bits(129_280)
    w = exp2_fixed(z, f)
    assert int(w[0]) == 2 ** f
    assert bool((w[1:] <= w[:-1]).all()), "weights must not increase as z decreases"
    exact = torch.exp2(z.double()) * 2.0 ** f
    # < 5e-9 relative from the Q30 polynomial, plus the final floor (< 1 unit of 2^-F)
    assert bool(((w.double() - exact).abs() <= exact * 1e-8 + 1).all())
    assert int(exp2_fixed(torch.tensor([-math.inf, -64.0, -100.0]), f).abs().sum()) == 0


@given(rows=logit_rows(3, 11), data=st.data())
def test_reference_is_the_tie_symmetric_rule_exactly(rows, data):
    """probs_ref (sort + integer cumsum) equals the O(V²) definitions evaluated on the same integer weights:
    top-k keeps x iff fewer than k logits are strictly larger; top-p iff the kept weight strictly above x is
    below top_p·S (one fp64 product)."""
    n, v = rows.shape
    t, k, p = data.draw(filter_params(n, v, rows))
    got = probs_ref(rows, t, k, p)
    f = fixed_bits(v)
    for i in range(n):
        l = rows[i]
        if t[i] <= 0:
            assert int(got[i].argmax()) == int(l.argmax()) and float(got[i].sum()) == 1.0
            continue
        c = (torch.full((1,), sampling._LOG2E) / t[i:i + 1]).clamp(max=sampling._C_MAX)
        w = sampling._weights(l[None], l.max(), c, f)[0]
        greater = l[None, :] > l[:, None]  # [x, y]: y strictly more likely than x
        keep = greater.sum(-1) < (int(k[i]) if 0 < int(k[i]) < v else v + 1)
        if float(p[i]) < 1:
            s = int(w[keep].sum())
            above = (greater & keep[None, :]).long().mul(w[None, :]).sum(-1)
            keep &= above.double() < float(p[i]) * float(s)
            keep |= l == l.max()  # the crossing token is always kept
        w = torch.where(keep, w, 0)
        want = torch.where(keep, (w.double() * (1.0 / w.sum().double())).float(), 0.0)
        assert_equal(got[i], want, f"row {i}")


@given(rows=logit_rows(4, 11), data=st.data())
def test_a_filter_passed_as_none_is_off_for_every_row(rows, data):
    """None (no request uses the filter, known on the host) gives bit for bit what explicit off values
    give, in the reference (which then skips its sort) and through the kernels."""
    n, v = rows.shape
    t, k, p = data.draw(filter_params(n, v, rows))
    k_off, p_off = torch.zeros(n, dtype=torch.long), torch.ones(n)
    u = torch.rand(n, generator=generator(data.draw(seeds())))
    for top_k, top_p, want_k, want_p in [(None, None, k_off, p_off), (None, p, k_off, p), (k, None, k, p_off)]:
        want = probs_ref(rows, t, want_k, want_p)
        assert_equal(probs_ref(rows, t, top_k, top_p), want, "reference")
        if _launch.HAS_TRITON:
            assert_equal(probs(rows, t, top_k, top_p, kernels="triton"), want, "kernel")
            assert_equal(sample_logits(rows, t, top_k, top_p, u, kernels="triton"), sample_ref(want, u), "tokens")


@given(rows=logit_rows(4, 11), data=st.data())
def test_temperature_none_is_greedy_for_every_row(rows, data):
    """temperature None (every request greedy, known on the host) gives bit for bit what temperature 0 gives,
    whatever the filters, in the reference (which then skips the integer weights) and through the kernels."""
    n, v = rows.shape
    _, k, p = data.draw(filter_params(n, v, rows))
    k, p = data.draw(st.sampled_from([(k, p), (None, None), (k, None)]))
    u = torch.rand(n, generator=generator(data.draw(seeds())))
    want = probs_ref(rows, torch.zeros(n), k, p)
    assert_equal(probs_ref(rows, None, k, p), want, "reference")
    assert_equal(sample_logits_ref(rows, None, k, p, u), rows.argmax(-1), "reference tokens")
    if _launch.HAS_TRITON:
        assert_equal(probs(rows, None, k, p, kernels="triton"), want, "kernel")
        assert_equal(sample_logits(rows, None, k, p, u, kernels="triton"), rows.argmax(-1), "kernel tokens")


# ---------------------------------------------------------------------------------------------------
# Kernels against references.


@needs_triton
@given(v=st.sampled_from(VOCABS), n=st.sampled_from([1, 2, 5]), dtype=st.sampled_from([torch.float32, torch.float16]),
       data=st.data())
def test_probs_kernel_is_bit_identical(v, n, dtype, data):
    logits = data.draw(logit_rows(n, v)).to(dtype)
    t, k, p = data.draw(filter_params(n, v, logits.float()))
    with poisoned_outputs():
        got = probs(logits, t, k, p, kernels="triton")
    assert got.dtype == torch.float32 and got.shape == (n, v)
    assert_equal(got, probs_ref(logits, t, k, p), "filtered probs")


@needs_triton
@given(v=st.sampled_from(VOCABS), n=st.sampled_from([1, 3, 4]), data=st.data())
def test_sample_kernel_is_bit_identical(v, n, data):
    """Probability rows with zeros / ties / spikes, all-zero rows, unnormalised residual-like rows, and
    uniforms at 0, just below 1, 1 (the fallback) and exactly on a prefix-mass boundary."""
    rows = []
    for _ in range(n):
        kind = data.draw(st.sampled_from(["row", "zero", "scaled", "tiny"]))
        row = data.draw(probability_rows(v))
        rows.append({"row": row, "zero": torch.zeros(v), "scaled": row * 0.37, "tiny": row * 1e-30}[kind])
    pr = torch.stack(rows)
    u = torch.tensor([data.draw(st.sampled_from([0.0, 0.25, 0.5, ALMOST_ONE, 1.0, 0.123456])) for _ in range(n)])
    if data.draw(st.booleans()):  # u·total lands exactly on a prefix sum
        w = sampling.quantize_probs(pr, fixed_bits(v))
        i, j = data.draw(st.integers(0, n - 1)), data.draw(st.integers(0, v - 1))
        total = int(w[i].sum())
        if total:
            u[i] = float(w[i, : j + 1].sum()) / total
    with poisoned_outputs():
        got = sample(pr, u, kernels="triton")
    want = sample_ref(pr, u)
    assert_equal(got, want, "sampled tokens")
    assert bool((pr.gather(1, got[:, None]) > 0).squeeze(1)[pr.sum(1) > 0].all()), "zero-probability token drawn"


@needs_triton
@given(v=st.sampled_from(VOCABS), n=st.sampled_from([1, 2, 5]), dtype=st.sampled_from([torch.float32, torch.float16]),
       data=st.data())
def test_sample_logits_kernel_is_bit_identical(v, n, dtype, data):
    logits = data.draw(logit_rows(n, v)).to(dtype)
    t, k, p = data.draw(filter_params(n, v, logits.float()))
    u = torch.tensor([data.draw(st.sampled_from([0.0, 0.3, 0.7, ALMOST_ONE, 1.0])) for _ in range(n)])
    with poisoned_outputs():
        got = sample_logits(logits, t, k, p, u, kernels="triton")
    assert_equal(got, sample_logits_ref(logits, t, k, p, u), "fused sample")
    assert_equal(got, sample(probs(logits, t, k, p, kernels="triton"), u, kernels="triton"), "fused vs two kernels")


@needs_triton
@pytest.mark.parametrize("n", [64, pytest.param(2048, marks=pytest.mark.extended)])
def test_stratified_sampling_through_the_kernels_is_exact(n):
    """The kernels' induced distribution on a midpoint grid of u matches probs to grid resolution
    (one program per grid point: the interpreter makes the fine grid an extended-tier test)."""
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(1, 13, generator=g) * 2
    logits[0, 4] = -math.inf
    u = (torch.arange(n) + 0.5) / n
    params = (torch.full((n,), 0.8), torch.full((n,), 6), torch.full((n,), 0.9))
    tokens = sample_logits(logits.expand(n, -1), *params, u, kernels="triton")
    pr = probs_ref(logits, *(x[:1] for x in params))[0]
    freq = torch.bincount(tokens, minlength=13).double() / n
    assert (freq[pr == 0] == 0).all()
    assert_close(freq, pr.double(), atol=1.0 / n + 1e-6, rtol=0, what="stratified frequencies")


@needs_triton
def test_strided_inputs_and_parameter_layouts():
    """Row-strided logits (a slice), int32 top_k and strided per-row tensors (u[:, j] as in decode)."""
    g = torch.Generator().manual_seed(5)
    big = torch.randn(6, 140, generator=g)
    logits = big[::2, 3:132]  # [3, 129], row stride 280, unit last stride
    params = torch.tensor([[0.7, 5.0, 0.9], [1.0, 0.0, 0.5], [0.0, 2.0, 1.0]])  # per row: t, k, p
    t, p = params[:, 0], params[:, 2]  # stride 3
    k = params[:, 1].to(torch.int32)
    u = torch.rand(3, 4, generator=g)[:, 1]
    assert_equal(probs(logits, t, k, p, kernels="triton"), probs_ref(logits, t, k, p), "strided probs")
    assert_equal(sample_logits(logits, t, k, p, u, kernels="triton"), sample_logits_ref(logits, t, k, p, u), "tokens")


@needs_triton
def test_larger_vocabulary_near_ties():
    """V = 1000 (several tiles and search passes): a block of 1-ulp neighbours straddles the top-k / top-p cut."""
    g = torch.Generator().manual_seed(7)
    row = torch.randn(1000, generator=g)
    base = torch.full((60,), 2.5)
    steps = torch.randint(0, 4, (60,), generator=g)
    for s in range(1, 4):
        base = torch.where(steps >= s, torch.nextafter(base, torch.tensor(math.inf)), base)
    row[torch.randperm(1000, generator=g)[:60]] = base
    logits = row.expand(4, -1).contiguous()
    t = torch.tensor([1.0, 1.0, 0.3, 1.0])
    k = torch.tensor([30, 0, 45, 61])
    p = torch.tensor([1.0, 0.3, 0.9, 0.5])
    want = probs_ref(logits, t, k, p)
    assert_equal(probs(logits, t, k, p, kernels="triton"), want, "probs")
    assert (want[0] > 0).sum() >= 30


# ---------------------------------------------------------------------------------------------------
# Dispatch, validation, registration.


def test_auto_on_cpu_runs_the_reference(monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("kernel launched for CPU inputs with kernels='auto'")

    monkeypatch.setattr(sampling, "launch", boom)
    logits = torch.randn(2, 7)
    t, k, p, u = torch.ones(2), torch.zeros(2, dtype=torch.long), torch.ones(2), torch.rand(2)
    assert torch.equal(probs(logits, t, k, p), probs_ref(logits, t, k, p))
    assert torch.equal(sample(probs_ref(logits, t, k, p), u), sample_ref(probs_ref(logits, t, k, p), u))
    assert torch.equal(sample_logits(logits, t, k, p, u, kernels="ref"), sample_logits_ref(logits, t, k, p, u))
    with pytest.raises(ValueError, match="kernels"):
        probs(logits, t, k, p, kernels="cuda")


@needs_triton
def test_launchers_validate_instead_of_copying():
    logits = torch.randn(3, 9)
    t, k, p = torch.ones(3), torch.zeros(3, dtype=torch.long), torch.ones(3)
    cases = {
        "fp64 logits": (logits.double(), t, k, p),
        "column-major logits": (torch.randn(9, 3).t(), t, k, p),
        "1-D logits": (logits[0], t[:1], k[:1], p[:1]),
        "fp64 temperature": (logits, t.double(), k, p),
        "float top_k": (logits, t, k.float(), p),
        "short top_p": (logits, t, k, p[:2]),
    }
    for name, args in cases.items():
        with pytest.raises(ValueError):
            probs(*args, kernels="triton")
    with pytest.raises(ValueError):
        sample(torch.rand(3, 9), torch.rand(4), kernels="triton")


@needs_triton
@pytest.mark.parametrize("op", ["probs", "sample", "sample_logits"])
def test_opcheck(op):
    """Schema, autograd registration and fake-tensor propagation on CPU. NOTE: test_aot_dispatch_dynamic
    traces the kernel into a graph, which the interpreter cannot do (see _launch.launch); it runs in the
    GPU variant below."""
    logits = torch.randn(3, 37)
    t, k, p, u = torch.tensor([0.0, 1.0, 0.7]), torch.tensor([0, 5, 2]), torch.tensor([1.0, 0.9, 0.5]), torch.rand(3)
    args = {"probs": (logits, t, k, p), "sample": (probs_ref(logits, t, k, p), u),
            "sample_logits": (logits, t, k, p, u)}[op]
    torch.library.opcheck(getattr(torch.ops.dspark, op), args,
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


# ---------------------------------------------------------------------------------------------------
# GPU: bf16 logits, the V4 vocabulary, full opcheck.


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_probs_and_sampling_v4_vocab(dtype):
    g = torch.Generator(device="cuda").manual_seed(0)
    n, v = 64, 129_280
    logits = (torch.randn(n, v, device="cuda", generator=g) * 4).to(dtype)
    logits[::7, :5000] = logits[::7, :1].clone()  # large tie blocks
    t = torch.tensor([0.0, 0.6, 1.0, 1.3] * (n // 4), device="cuda")
    k = torch.tensor([0, 1, 50, v, 0, 20, 0, 5000] * (n // 8), device="cuda")
    p = torch.tensor([1.0, 0.9, 0.5, 1e-6] * (n // 4), device="cuda")
    u = torch.rand(n, device="cuda", generator=g)
    with poisoned_outputs():
        got = probs(logits, t, k, p)
        tok = sample_logits(logits, t, k, p, u)
        tok2 = sample(got, u)
    want = probs_ref(logits, t, k, p)
    assert_equal(got, want, "probs")
    assert_equal(tok, sample_ref(want, u), "fused tokens")
    assert_equal(tok2, tok, "two-kernel tokens")


@pytest.mark.gpu
def test_gpu_opcheck_full():
    logits = torch.randn(3, 37, device="cuda")
    t = torch.tensor([0.0, 1.0, 0.7], device="cuda")
    k, p = torch.tensor([0, 5, 2], device="cuda"), torch.tensor([1.0, 0.9, 0.5], device="cuda")
    torch.library.opcheck(torch.ops.dspark.probs, (logits, t, k, p))
    torch.library.opcheck(torch.ops.dspark.sample_logits, (logits, t, k, p, torch.rand(3, device="cuda")))


@pytest.mark.extended
@needs_triton
@settings(max_examples=40)
@given(v=st.sampled_from([1000, 4099]), n=st.sampled_from([1, 3]),
       dtype=st.sampled_from([torch.float32, torch.float16]), data=st.data())
def test_probs_and_sample_kernels_large_vocab(v, n, dtype, data):
    logits = data.draw(logit_rows(n, v)).to(dtype)
    t, k, p = data.draw(filter_params(n, v, logits.float()))
    u = torch.tensor([data.draw(st.sampled_from([0.0, 0.3, ALMOST_ONE, 1.0])) for _ in range(n)])
    with poisoned_outputs():
        got = probs(logits, t, k, p, kernels="triton")
        tok = sample_logits(logits, t, k, p, u, kernels="triton")
    want = probs_ref(logits, t, k, p)
    assert_equal(got, want, "probs")
    assert_equal(tok, sample_ref(want, u), "tokens")
