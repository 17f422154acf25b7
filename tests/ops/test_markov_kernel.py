"""The Markov head's fused correction Ũ = U + W2·x (Triton, interpreter on CPU) against its reference;
the reference against the eager head; validation, registration, GPU bf16 and batch invariance.

Tolerances: fp32 dots run at IEEE precision (only the summation order differs). fp16 rounds the
product to fp16 in both, so a last-bit difference in the fp32 accumulation can move the rounded
product by one fp16 ulp: atol 2^-10 · max|W2·x| on top of the fp32 table."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, strategies as st

from dspark.model.markov import BlockHeads, MarkovHead
from dspark.ops import _launch
from dspark.ops.markov import markov_logits, markov_logits_ref
from tests.compare import assert_close
from tests.ops.test_sampling_kernel import poisoned_outputs
from tests.strategies import generator, seeds

needs_triton = pytest.mark.skipif(not _launch.HAS_TRITON, reason="needs triton")


def make_case(r, v, rank, dtype, seed, device="cpu"):
    g = generator(seed)
    logits = torch.randn(r, v, generator=g) * 3
    x = torch.randn(r, rank, generator=g).to(dtype)
    w2 = (torch.randn(v, rank, generator=g) / rank ** 0.5).to(dtype)
    return logits.to(device), x.to(device), w2.to(device)


def check(case, dtype):
    logits, x, w2 = case
    with poisoned_outputs():
        got = markov_logits(logits, x, w2, impl="triton")
    ref = markov_logits_ref(logits, x.float(), w2.float()) if dtype == torch.float32 else None
    assert got.dtype == torch.float32 and got.shape == logits.shape and not got.isnan().any()
    if ref is None:  # 16-bit: the reference rounds the product to the same dtype
        product = torch.nn.functional.linear(x.float(), w2.float())
        ref = logits + product.to(dtype).float()
        assert_close(got, ref, atol=2 ** -10 * float(product.abs().max()) + 1e-5, rtol=1e-5, what="fp16 correction")
    else:
        assert_close(got, ref, atol=1e-5, rtol=1e-5, what="fp32 correction")


@needs_triton
@given(r=st.sampled_from([1, 3, 16, 17, 40]), v=st.sampled_from([1, 7, 130, 300]),
       rank=st.sampled_from([1, 6, 32, 33, 70]), seed=seeds())
def test_kernel_matches_reference(r, v, rank, seed):
    check(make_case(r, v, rank, torch.float32, seed), torch.float32)


@needs_triton
def test_fp16_matches_reference():
    check(make_case(5, 257, 32, torch.float16, 1), torch.float16)


def test_reference_is_the_eager_head():
    """`BlockHeads.markov_logits` (which dispatches here) equals the head's own linear plus U."""
    head = MarkovHead(50, 8, "gated", hidden_size=12)
    holder = BlockHeads()
    holder.markov_head = head
    g = generator(0)
    logits, prev, h = torch.randn(4, 50, generator=g), torch.randint(0, 50, (4,), generator=g), torch.randn(4, 12)
    with torch.no_grad():
        got, _ = holder.markov_logits(logits, prev, h)
        x, _ = head.step(prev, h, None)
        assert torch.equal(got, logits + head.markov_w2(x).float())


@needs_triton
def test_bad_inputs_raise():
    logits, x, w2 = make_case(3, 20, 8, torch.float32, 0)
    with pytest.raises(ValueError, match="x: 2 rows"):
        markov_logits(logits, x[:2], w2, impl="triton")
    with pytest.raises(ValueError, match="w2"):
        markov_logits(logits, x, w2[:, :4], impl="triton")
    with pytest.raises(ValueError, match="w2"):
        markov_logits(logits, x, w2.half(), impl="triton")


@needs_triton
def test_opcheck():
    logits, x, w2 = make_case(3, 20, 8, torch.float32, 0)
    torch.library.opcheck(torch.ops.dspark.markov_logits.default, (logits, x, w2),
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_matches_reference_and_is_batch_invariant(dtype):
    logits, x, w2 = make_case(40, 129280, 256, dtype, 3, device="cuda")
    got = markov_logits(logits, x, w2)
    product = torch.nn.functional.linear(x.float(), w2.float())
    ref = logits + product.to(dtype).float()
    assert_close(got, ref, atol=2 ** -7 * float(product.abs().max()) + 1e-5, rtol=1e-5, what=f"{dtype} correction")
    alone = markov_logits(logits[7:8], x[7:8], w2)
    assert torch.equal(alone[0], got[7])
