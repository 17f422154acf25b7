"""Block quantisation of DeepSeek-V4 release weights (deepseek_v4.md §13.1, dspark_v4.md §2.2).

Two formats, both with UE8M0 scales (an 8-bit biased exponent: 2^(u−127), u = 255 is NaN):

* FP8: e4m3 weights [N, K] with one scale per 128×128 block, `w = q · scale[n // 128, k // 128]`
  (last blocks ragged when N or K is not a multiple of the block).
* FP4 (routed experts): e2m1 values packed two per byte, [N, K/2] int8; the LOW nibble holds the
  even element index (OCP MX convention), one scale per 32 consecutive input elements, [N, K/32].
  e2m1 codes 0..7 are 0, .5, 1, 1.5, 2, 3, 4, 6; bit 3 is the sign.

Scales are accepted as `float8_e8m0fnu`, raw `uint8` exponents or `float32`. Quantisers pick
power-of-two scales, so dividing by them is exact and a value already on the grid round-trips.
"""

from __future__ import annotations

import math

import torch

FP8_MAX = 448.0  # largest finite float8_e4m3fn
FP4_BLOCK = 32
FP4_MAX = 6.0
FP4_VALUES = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
# Round-to-nearest boundaries between consecutive FP4_VALUES magnitudes.
_FP4_MIDPOINTS = (FP4_VALUES[1:] + FP4_VALUES[:-1]) / 2
SCALE_DTYPES = (torch.float8_e8m0fnu, torch.uint8, torch.float32)


def scale_to_float(scale: torch.Tensor) -> torch.Tensor:
    """A UE8M0 scale tensor (e8m0, raw uint8 exponents or float32) as float32."""
    if scale.dtype == torch.uint8:
        scale = scale.view(torch.float8_e8m0fnu)
    elif scale.dtype not in SCALE_DTYPES:
        raise ValueError(f"scale dtype must be one of {SCALE_DTYPES}, got {scale.dtype}")
    return scale.to(torch.float32)


def _check_block(block: tuple[int, int]) -> tuple[int, int]:
    if len(block) != 2 or not all(isinstance(b, int) and b > 0 for b in block):
        raise ValueError(f"block must be two positive ints, got {block!r}")
    return block[0], block[1]


def _expand(scale: torch.Tensor, rows: int, cols: int, block: tuple[int, int]) -> torch.Tensor:
    """Per-block scale [ceil(rows/bn), ceil(cols/bk)] → per-element [rows, cols]."""
    bn, bk = block
    return scale.repeat_interleave(bn, dim=0)[:rows].repeat_interleave(bk, dim=1)[:, :cols]


def _pow2_scale(amax: torch.Tensor, qmax: float) -> torch.Tensor:
    """Smallest power of two s with amax / s <= qmax, clamped to the UE8M0 range (1 for amax = 0)."""
    exp = torch.ceil(torch.log2(amax / qmax)).clamp(-127, 127)
    return torch.where(amax > 0, torch.exp2(exp), torch.ones_like(amax))


def _scale_as(scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if dtype == torch.float32:
        return scale
    if dtype == torch.float8_e8m0fnu:
        return scale.to(torch.float8_e8m0fnu)
    if dtype == torch.uint8:
        return scale.to(torch.float8_e8m0fnu).view(torch.uint8)
    raise ValueError(f"scale_dtype must be one of {SCALE_DTYPES}, got {dtype}")


def _check_finite(w: torch.Tensor, what: str) -> None:
    if not torch.isfinite(w).all():
        raise ValueError(f"{what}: cannot quantise a tensor holding inf or NaN")


# ------------------------------------------------------------------------------------------ FP8
def dequantize_fp8(weight: torch.Tensor, scale: torch.Tensor,
                   block: tuple[int, int] = (128, 128)) -> torch.Tensor:
    """FP8 e4m3 weight [N, K] with block scales [ceil(N/bn), ceil(K/bk)] → float32 [N, K]."""
    bn, bk = _check_block(block)
    if weight.dtype != torch.float8_e4m3fn:
        raise ValueError(f"FP8 weight must be float8_e4m3fn, got {weight.dtype}")
    if weight.dim() != 2 or scale.dim() != 2:
        raise ValueError(f"FP8 weight and scale must be 2-D, got {tuple(weight.shape)} and {tuple(scale.shape)}")
    n, k = weight.shape
    want = (math.ceil(n / bn), math.ceil(k / bk))
    if tuple(scale.shape) != want:
        raise ValueError(f"FP8 weight {tuple(weight.shape)} with {bn}x{bk} blocks needs scale {list(want)}, "
                         f"got {list(scale.shape)}")
    return weight.to(torch.float32) * _expand(scale_to_float(scale), n, k, (bn, bk))


def quantize_fp8(w: torch.Tensor, block: tuple[int, int] = (128, 128),
                 scale_dtype: torch.dtype = torch.float8_e8m0fnu) -> tuple[torch.Tensor, torch.Tensor]:
    """float [N, K] → (float8_e4m3fn [N, K], power-of-two block scale [ceil(N/bn), ceil(K/bk)])."""
    bn, bk = _check_block(block)
    if w.dim() != 2 or not w.is_floating_point():
        raise ValueError(f"quantize_fp8 needs a 2-D float tensor, got {w.dtype} {tuple(w.shape)}")
    _check_finite(w, "quantize_fp8")
    n, k = w.shape
    nb, kb = math.ceil(n / bn), math.ceil(k / bk)
    w32 = w.to(torch.float32)
    padded = torch.zeros(nb * bn, kb * bk, dtype=torch.float32, device=w.device)
    padded[:n, :k] = w32.abs()
    amax = padded.view(nb, bn, kb, bk).amax(dim=(1, 3))  # [nb, kb]
    scale = _pow2_scale(amax, FP8_MAX)
    q = (w32 / _expand(scale, n, k, (bn, bk))).to(torch.float8_e4m3fn)
    return q, _scale_as(scale, scale_dtype)


# ------------------------------------------------------------------------------------------ FP4
def dequantize_fp4(packed: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Packed e2m1 [N, K/2] (int8 or uint8) with scales [N, ceil(K/32)] → float32 [N, K]."""
    if packed.dtype not in (torch.int8, torch.uint8):
        raise ValueError(f"FP4 weight must be packed int8 or uint8, got {packed.dtype}")
    if packed.dim() != 2 or scale.dim() != 2:
        raise ValueError(f"FP4 weight and scale must be 2-D, got {tuple(packed.shape)} and {tuple(scale.shape)}")
    n, k = packed.shape[0], 2 * packed.shape[1]
    want = (n, math.ceil(k / FP4_BLOCK))
    if tuple(scale.shape) != want:
        raise ValueError(f"FP4 weight of logical shape [{n}, {k}] needs scale {list(want)}, got {list(scale.shape)}")
    byte = packed.view(torch.uint8).to(torch.int64)
    codes = torch.stack((byte & 0xF, byte >> 4), dim=-1).reshape(n, k)  # low nibble = even index
    lut = torch.cat((FP4_VALUES, -FP4_VALUES)).to(packed.device)
    return lut[codes] * _expand(scale_to_float(scale), n, k, (1, FP4_BLOCK))


def quantize_fp4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float [N, K] (K even) → (packed int8 [N, K/2], e8m0 scale [N, ceil(K/32)]).

    Rounds to the nearest e2m1 value, ties to the even code.
    """
    if w.dim() != 2 or not w.is_floating_point() or w.shape[1] % 2:
        raise ValueError(f"quantize_fp4 needs a 2-D float tensor with an even last dim, got {w.dtype} "
                         f"{tuple(w.shape)}")
    _check_finite(w, "quantize_fp4")
    n, k = w.shape
    groups = math.ceil(k / FP4_BLOCK)
    w32 = w.to(torch.float32)
    padded = torch.zeros(n, groups * FP4_BLOCK, dtype=torch.float32, device=w.device)
    padded[:, :k] = w32.abs()
    scale = _pow2_scale(padded.view(n, groups, FP4_BLOCK).amax(dim=-1), FP4_MAX)  # [N, groups]
    mag = (w32.abs() / _expand(scale, n, k, (1, FP4_BLOCK))).clamp(max=FP4_MAX)
    mids = _FP4_MIDPOINTS.to(w.device)
    code = torch.bucketize(mag, mids)  # a value on a midpoint gets the lower code ...
    on_mid = mag == mids[code.clamp(max=len(mids) - 1)]
    code = code + (on_mid & (code % 2 == 1)).to(code.dtype)  # ... and ties go to the even code
    code = code | ((w32 < 0).to(torch.int64) << 3)
    packed = (code[:, 0::2] | (code[:, 1::2] << 4)).to(torch.uint8).view(torch.int8)
    return packed, _scale_as(scale, torch.float8_e8m0fnu)
