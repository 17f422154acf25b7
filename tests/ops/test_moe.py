"""MoE references: the grouped (training) path equals the per-token gather path, gradients included; `experts`
chooses among the paths."""

from __future__ import annotations

from unittest import mock

import torch
from hypothesis import given, strategies as st

from dspark.ops import moe
from dspark.ops.moe import experts, experts_dense, experts_ref, experts_sorted
from tests.compare import assert_close
from tests.strategies import routings


@given(n=st.integers(1, 40), data=st.data())
def test_sorted_experts_equal_the_reference(n, data):
    g = torch.Generator().manual_seed(n)
    e, k, d, i = 7, 3, 12, 10
    idx = data.draw(routings(n, e, k)).clone()
    if n > 2:
        idx[1, -1] = -1  # a slot routed nowhere
    x = torch.randn(n, d, generator=g, requires_grad=True)
    gu = torch.randn(e, 2 * i, d, generator=g, requires_grad=True)
    dn = torch.randn(e, d, i, generator=g, requires_grad=True)
    w = torch.rand(n, k, generator=g)
    ref = experts_ref(x, w, idx, gu, dn, 10.0)
    got = experts_sorted(x, w, idx, gu, dn, 10.0)
    assert_close(got, ref, atol=1e-4, rtol=1e-5, what="grouped experts")  # summation order differs
    grads_ref = torch.autograd.grad(ref.square().sum(), (x, gu, dn))
    grads_got = torch.autograd.grad(got.square().sum(), (x, gu, dn))
    for a, b in zip(grads_got, grads_ref):
        # Weight gradients reach ~4e4 here; an element that cancels to ~0 still carries fp32 rounding
        # of the large terms summed into it (in a different order), so atol scales with the tensor.
        assert_close(a, b, atol=1e-3 + 1e-6 * float(b.abs().max()), rtol=1e-4, what="gradient")


@given(n=st.integers(1, 40), data=st.data())
def test_dense_experts_equal_the_reference(n, data):
    """Every expert on every token, weighted (0 where not routed): the reference's result, a slot
    routed nowhere and a repeated expert (hash tables may repeat one) included."""
    g = torch.Generator().manual_seed(n)
    e, k, d, i = 7, 3, 12, 10
    idx = data.draw(routings(n, e, k)).clone()
    if n > 2:
        idx[1, -1] = -1
        idx[2, 1] = idx[2, 0]
    x = torch.randn(n, d, generator=g)
    gu = torch.randn(e, 2 * i, d, generator=g)
    dn = torch.randn(e, d, i, generator=g)
    w = torch.rand(n, k, generator=g)
    assert_close(experts_dense(x, w, idx, gu, dn, 10.0), experts_ref(x, w, idx, gu, dn, 10.0), atol=1e-4, rtol=1e-5,
                 what="dense experts")


def test_inference_path_choice_is_static_and_exact():
    """`experts` picks the dense path from shapes only; both choices give the reference's result."""
    g = torch.Generator().manual_seed(0)
    gu, dn = torch.randn(8, 20, 12, generator=g), torch.randn(8, 12, 10, generator=g)
    for n in (1, 8, 64):
        x = torch.randn(n, 12, generator=g)
        idx = torch.rand(n, 8, generator=g).argsort(-1)[:, :2]
        w = torch.rand(n, 2, generator=g)
        assert_close(experts(x, w, idx, gu, dn, 10.0), experts_ref(x, w, idx, gu, dn, 10.0), atol=1e-4, rtol=1e-5,
                     what=f"experts, {n} tokens")


def test_training_takes_the_grouped_path_whatever_the_kernels():
    """`experts` alone picks the path: with autograd recording through the expert weights it runs
    `experts_sorted` (kernels="triton" included, whose kernels are forward-only); under no_grad it does not."""
    g = torch.Generator().manual_seed(1)
    gu = torch.randn(8, 20, 12, generator=g, requires_grad=True)
    dn = torch.randn(8, 12, 10, generator=g, requires_grad=True)
    x = torch.randn(5, 12, generator=g)
    idx, w = torch.rand(5, 8, generator=g).argsort(-1)[:, :2], torch.rand(5, 2, generator=g)
    for kernels in ("auto", "ref", "triton"):
        with mock.patch.object(moe, "experts_sorted", wraps=moe.experts_sorted) as grouped:
            out = experts(x, w, idx, gu, dn, 10.0, kernels=kernels)
            assert grouped.call_count == 1, kernels
            assert out.requires_grad
            with torch.no_grad():
                experts(x, w, idx, gu, dn, 10.0, kernels="ref")
            assert grouped.call_count == 1, "inference must not take the grouped (host-reading) path"
        assert_close(out, experts_ref(x, w, idx, gu, dn, 10.0), atol=1e-4, rtol=1e-5, what=f"training, {kernels}")
