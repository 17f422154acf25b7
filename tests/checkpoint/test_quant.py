"""FP8 (128×128 block) and FP4 (e2m1, 32-element group) quantisation helpers."""

from __future__ import annotations

import math

import pytest
import torch

from dspark.checkpoint.quant import (FP4_VALUES, dequantize_fp4, dequantize_fp8, quantize_fp4, quantize_fp8,
                                scale_to_float)
from tests.compare import assert_close

SHAPES = [(1, 1), (7, 130), (128, 128), (130, 300), (257, 64)]


def random_fp8(shape, gen) -> torch.Tensor:
    """Random finite e4m3 values (every bit pattern except the two NaNs 0x7F / 0xFF)."""
    bits = torch.randint(0, 256, shape, generator=gen, dtype=torch.uint8)
    bits = torch.where((bits & 0x7F) == 0x7F, bits ^ 0x01, bits)
    return bits.view(torch.float8_e4m3fn)


def random_scale(shape, gen, lo=110, hi=140) -> torch.Tensor:
    return torch.randint(lo, hi, shape, generator=gen, dtype=torch.uint8).view(torch.float8_e8m0fnu)


def block_reference(q: torch.Tensor, scale: torch.Tensor, bn: int, bk: int) -> torch.Tensor:
    """Element-by-block loop: w[r, c] = q[r, c] * scale[r // bn, c // bk]."""
    s = scale.float()
    out = torch.empty(q.shape)
    for r in range(q.shape[0]):
        for cb in range(math.ceil(q.shape[1] / bk)):
            out[r, cb * bk:(cb + 1) * bk] = q[r, cb * bk:(cb + 1) * bk].float() * s[r // bn, cb]
    return out


# ------------------------------------------------------------------------------------------ FP8
def test_fp8_known_bit_patterns():
    # e4m3fn: 0x38 = 1.0, 0x40 = 2.0, 0xB8 = -1.0, 0x7E = 448, 0x01 = 2^-9 (smallest subnormal)
    q = torch.tensor([[0x38, 0x40, 0xB8, 0x7E, 0x01, 0x00]], dtype=torch.uint8).view(torch.float8_e4m3fn)
    expected = torch.tensor([[2.0, 4.0, -2.0, 896.0, 2.0 ** -8, 0.0]])
    for scale in (torch.tensor([[128]], dtype=torch.uint8),  # raw exponent 128 → 2^1
                  torch.tensor([[2.0]]).to(torch.float8_e8m0fnu), torch.tensor([[2.0]])):
        assert torch.equal(dequantize_fp8(q, scale), expected), scale.dtype


@pytest.mark.parametrize("shape", SHAPES)
def test_fp8_block_layout_ragged(shape):
    gen = torch.Generator().manual_seed(0)
    q = random_fp8(shape, gen)
    scale = random_scale((math.ceil(shape[0] / 128), math.ceil(shape[1] / 128)), gen)
    out = dequantize_fp8(q, scale)
    assert out.dtype == torch.float32 and out.shape == shape
    assert torch.equal(out, block_reference(q, scale, 128, 128))


def test_fp8_other_block_size():
    gen = torch.Generator().manual_seed(1)
    q, scale = random_fp8((70, 45), gen), random_scale((3, 2), gen)
    assert torch.equal(dequantize_fp8(q, scale, block=(32, 32)), block_reference(q, scale, 32, 32))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("scale_dtype", [torch.float8_e8m0fnu, torch.uint8, torch.float32])
def test_fp8_round_trip_exact_on_grid(shape, scale_dtype):
    """A weight that is already fp8 · 2^k per block quantises back to itself."""
    gen = torch.Generator().manual_seed(2)
    w = dequantize_fp8(random_fp8(shape, gen), random_scale((math.ceil(shape[0] / 128),
                                                               math.ceil(shape[1] / 128)), gen))
    q, scale = quantize_fp8(w, scale_dtype=scale_dtype)
    assert q.dtype == torch.float8_e4m3fn and scale.dtype == scale_dtype
    assert torch.equal(dequantize_fp8(q, scale), w)
    s = scale_to_float(scale)
    assert torch.equal(s, torch.exp2(torch.log2(s).round())), "scales must be powers of two"


def test_fp8_quantisation_error_bound():
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(200, 300, generator=gen) * torch.logspace(-3, 2, 300)
    q, scale = quantize_fp8(w)
    # e4m3 keeps 3 mantissa bits: relative error <= 2^-4 for normals; subnormals are spaced
    # 2^-9 · scale, so atol covers half of the largest block's spacing.
    assert_close(dequantize_fp8(q, scale), w, rtol=2 ** -4, atol=float(scale.float().max()) * 2 ** -10,
                 what="fp8 round trip")
    assert float(q.float().abs().max()) <= 448


def test_fp8_scale_choice_and_empty_blocks():
    w = torch.zeros(130, 130)
    w[0, 0] = 3.0
    q, scale = quantize_fp8(w)
    # smallest power of two with 3 / s <= 448 is 2^-7; all-zero blocks get scale 1
    assert scale.float().tolist() == [[2.0 ** -7, 1.0], [1.0, 1.0]]
    assert torch.equal(dequantize_fp8(q, scale), w)


def test_fp8_nan_scale_propagates():
    q = torch.ones(2, 2).to(torch.float8_e4m3fn)
    out = dequantize_fp8(q, torch.tensor([[255]], dtype=torch.uint8))  # UE8M0 0xFF is NaN
    assert torch.isnan(out).all()


@pytest.mark.parametrize("make, message", [
    (lambda: dequantize_fp8(torch.ones(4, 4), torch.ones(1, 1)), "float8_e4m3fn"),
    (lambda: dequantize_fp8(torch.ones(4).to(torch.float8_e4m3fn), torch.ones(1, 1)), "2-D"),
    (lambda: dequantize_fp8(torch.ones(130, 4).to(torch.float8_e4m3fn), torch.ones(1, 1)), r"needs scale \[2, 1\]"),
    (lambda: dequantize_fp8(torch.ones(4, 4).to(torch.float8_e4m3fn), torch.ones(1, 1, dtype=torch.float16)),
     "scale dtype"),
    (lambda: dequantize_fp8(torch.ones(4, 4).to(torch.float8_e4m3fn), torch.ones(1, 1), block=(0, 128)), "block"),
    (lambda: quantize_fp8(torch.tensor([[1.0, float("nan")]])), "inf or NaN"),
    (lambda: quantize_fp8(torch.ones(2, 2, dtype=torch.int32)), "2-D float"),
    (lambda: quantize_fp8(torch.ones(2, 2), scale_dtype=torch.float16), "scale_dtype"),
])
def test_fp8_bad_inputs_refused(make, message):
    with pytest.raises(ValueError, match=message):
        make()


# ------------------------------------------------------------------------------------------ FP4
def test_fp4_known_bit_patterns():
    # every code once: byte j holds codes (2j, 2j+1); the LOW nibble is the even element
    codes = torch.arange(16, dtype=torch.uint8)
    packed = (codes[0::2] | (codes[1::2] << 4)).view(torch.int8).reshape(1, 8)
    out = dequantize_fp4(packed, torch.tensor([[127]], dtype=torch.uint8))  # scale 2^0
    assert torch.equal(out, torch.cat((FP4_VALUES, -FP4_VALUES)).reshape(1, 16))
    # 0x21: low nibble 1 (0.5) first, high nibble 2 (1.0) second; 0xF8: -0 then -6
    packed = torch.tensor([[0x21, 0xF8]], dtype=torch.uint8)
    out = dequantize_fp4(packed, torch.tensor([[0.25]]))
    assert out.tolist() == [[0.125, 0.25, -0.0, -1.5]]


def test_fp4_scale_per_32_elements_ragged():
    packed = torch.full((2, 40), 0x22, dtype=torch.uint8)  # every element 1.0, K = 80 → 3 groups
    scale = torch.tensor([[1.0, 8.0, 0.5], [2.0, 4.0, 16.0]])
    out = dequantize_fp4(packed, scale)
    expected = scale.repeat_interleave(32, dim=1)[:, :80]
    assert torch.equal(out, expected)


def test_fp4_round_trip_exact_on_grid():
    gen = torch.Generator().manual_seed(4)
    packed = torch.randint(0, 256, (33, 48), generator=gen, dtype=torch.uint8).view(torch.int8)
    w = dequantize_fp4(packed, random_scale((33, 3), gen))
    q, scale = quantize_fp4(w)
    assert q.dtype == torch.int8 and q.shape == (33, 48) and scale.dtype == torch.float8_e8m0fnu
    assert torch.equal(dequantize_fp4(q, scale), w)


def test_fp4_rounds_to_nearest_ties_to_even():
    # scale 1 (amax 6): midpoints go to the even code (0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0)
    w = torch.tensor([[0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0, -0.3, -2.9, 0.0, -0.0]])
    q, scale = quantize_fp4(w)
    assert scale.float().item() == 1.0
    assert dequantize_fp4(q, scale).tolist() == [[0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, 6.0, -0.5, -3.0, 0.0, 0.0]]


def test_fp4_quantisation_error_bound():
    gen = torch.Generator().manual_seed(5)
    w = torch.randn(64, 96, generator=gen)
    q, scale = quantize_fp4(w)
    # e2m1 spacing is at most 2 (between 4 and 6) times the scale, so the error is <= 1 · scale
    err = (dequantize_fp4(q, scale) - w).abs()
    assert bool((err <= scale.float().repeat_interleave(32, dim=1)).all())


@pytest.mark.parametrize("make, message", [
    (lambda: dequantize_fp4(torch.ones(2, 2), torch.ones(2, 1)), "packed int8"),
    (lambda: dequantize_fp4(torch.ones(2, dtype=torch.int8), torch.ones(2, 1)), "2-D"),
    (lambda: dequantize_fp4(torch.ones(2, 32, dtype=torch.int8), torch.ones(2, 1)), r"needs scale \[2, 2\]"),
    (lambda: dequantize_fp4(torch.ones(2, 16, dtype=torch.int8), torch.ones(2, 1, dtype=torch.bfloat16)),
     "scale dtype"),
    (lambda: quantize_fp4(torch.ones(2, 3)), "even"),
    (lambda: quantize_fp4(torch.tensor([[float("inf"), 1.0]])), "inf or NaN"),
])
def test_fp4_bad_inputs_refused(make, message):
    with pytest.raises(ValueError, match=message):
        make()
