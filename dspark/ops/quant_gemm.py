"""GEMMs on DeepSeek-V4 release weights as stored: FP8 block-scaled linear layers and grouped FP4 experts.

Vocabulary and layouts (deepseek_v4.md §13.1; the same formats as `dspark.checkpoint.quant`):

    fp8_linear    x [T, K] (fp32 / bf16), w [N, K] e4m3 (`float8_e4m3fn`, or its raw bytes as uint8),
                  scale [ceil(N/bn), ceil(K/bk)] UE8M0 (`float8_e8m0fnu`, raw uint8 exponents or fp32)
                  → y [T, N] fp32 = x · (w ⊙ scale[n // bn, k // bk])ᵀ
    fp4_experts   x [S, K] (fp32 / bf16) rows grouped by expert in expert order: the first counts[0] rows
                  belong to expert 0, the next counts[1] to expert 1, ...; w [E, N, K/2] e2m1 packed two
                  per byte (int8 / uint8; the LOW nibble holds the even k), scale [E, N, ceil(K/32)] UE8M0
                  → y [S, N] fp32, y[s] = x[s] · (w[e(s)] ⊙ scale[e(s), n, k // 32])ᵀ; rows past Σ counts
                  (padding) are 0. counts [E] int32 / int64, on the device (never read on the host).

Decoding: e4m3 = (−1)^s · 2^(e−7) · (1 + m/8) for e > 0, 2^−6 · m/8 for e = 0, NaN for e = 15, m = 7 (no
infinities); e2m1 codes 0..7 are 0, .5, 1, 1.5, 2, 3, 4, 6, bit 3 the sign; UE8M0 u is 2^(u−127), u = 255
NaN. NaN weights or scales give NaN in every output they reach (as the references' matmul).

Kernels: the weights stay in their stored bytes in memory; each program loads a [BLOCK_K, BLOCK_N] tile
of raw bytes (uint8) and decodes it in registers with integer ops and a bit cast (exact, and the only way
Triton's CPU interpreter can run them: it cannot hold FP8 values), multiplies by the decoded scale,
casts to x's dtype (exact for bf16: a decoded value has at most 4 significant bits and a power-of-two
scale) and accumulates x · wᵀ in fp32 with `tl.dot`. So the result equals the reference up to fp32
summation order; with one-hot x it is bit-exact (tests/ops/test_quant_gemm.py). The grouped kernel
walks a device-built tile plan (as `dspark.ops.moe`): each tile is ≤ BLOCK_M rows of one expert.
fp16 x is refused: e4m3 · scale can leave fp16's range.
TODO(#18): not wired into the model yet (the loader still dequantises to bf16); a Hopper path with
native FP8 tl.dot on x quantised per 1×128 is a separate, lossy op.
"""

from __future__ import annotations

import torch

from dspark.ops._launch import INDEX_DTYPES, cdiv, check, check_tensor, dot, launch, register, tl, triton, use_triton

FP4_BLOCK = 32  # input elements per FP4 scale
X_DTYPES = (torch.float32, torch.bfloat16)
W8_DTYPES = (torch.float8_e4m3fn, torch.uint8)
W4_DTYPES = (torch.int8, torch.uint8)
SCALE_DTYPES = (torch.float8_e8m0fnu, torch.uint8, torch.float32)
_FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)


def _scale_f32(scale: torch.Tensor) -> torch.Tensor:
    """UE8M0 scales (e8m0, raw uint8 exponents or fp32) as fp32."""
    return (scale.view(torch.float8_e8m0fnu) if scale.dtype == torch.uint8 else scale).to(torch.float32)


def _expand(scale: torch.Tensor, rows: int, cols: int, bn: int, bk: int) -> torch.Tensor:
    """Per-block [ceil(rows/bn), ceil(cols/bk)] → per-element [rows, cols]."""
    return scale.repeat_interleave(bn, dim=0)[:rows].repeat_interleave(bk, dim=1)[:, :cols]


def decode_e4m3_ref(w: torch.Tensor) -> torch.Tensor:
    """e4m3 values (float8_e4m3fn or raw uint8 bytes) → fp32."""
    return (w.view(torch.float8_e4m3fn) if w.dtype == torch.uint8 else w).to(torch.float32)


def decode_e2m1_ref(packed: torch.Tensor) -> torch.Tensor:
    """Packed e2m1 [..., K/2] (int8 / uint8, low nibble = even k) → fp32 [..., K]."""
    byte = packed.view(torch.uint8).to(torch.int64)
    codes = torch.stack((byte & 0xF, byte >> 4), dim=-1).flatten(-2)  # [..., K]
    lut = torch.tensor(_FP4_VALUES + tuple(-v for v in _FP4_VALUES), device=packed.device)
    return lut[codes]


def fp8_linear_ref(x: torch.Tensor, w_fp8: torch.Tensor, scale: torch.Tensor,
                   block: tuple[int, int] = (128, 128)) -> torch.Tensor:
    n, k = w_fp8.shape
    w = decode_e4m3_ref(w_fp8) * _expand(_scale_f32(scale), n, k, *block)  # [N, K]
    return x.float() @ w.t()  # [T, N]


def fp4_experts_ref(x: torch.Tensor, w_fp4: torch.Tensor, scale: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    s, n = x.shape[0], w_fp4.shape[1]
    out = torch.zeros(s, n, dtype=torch.float32, device=x.device)  # padding rows stay 0
    row = 0
    for e, c in enumerate(counts.tolist()):
        rows = slice(min(row, s), min(row + c, s))
        w = decode_e2m1_ref(w_fp4[e])  # [N, K]
        w = w * _expand(_scale_f32(scale[e]), n, w.shape[1], 1, FP4_BLOCK)
        out[rows] = x[rows].float() @ w.t()  # [rows, N]
        row += c
    return out


# ----------------------------------------------------------------------------------------------------
# Triton kernels.


@triton.jit
def _e4m3_to_f32(b):
    """Raw e4m3 bytes (int32 0..255) → fp32, exact."""
    e = (b >> 3) & 15
    m = b & 7
    normal = (((e + 120) << 23) | (m << 20)).to(tl.float32, bitcast=True)  # 2^(e−7) · (1 + m/8)
    mag = tl.where(e == 0, m.to(tl.float32) * 0.001953125, normal)  # subnormal: m · 2^−9
    mag = tl.where((e == 15) & (m == 7), float("nan"), mag)
    return tl.where((b >> 7) == 1, -mag, mag)


@triton.jit
def _e2m1_to_f32(c):
    """e2m1 codes (int32 0..15) → fp32, exact."""
    e = (c >> 1) & 3
    m = c & 1
    normal = (((e + 126) << 23) | (m << 22)).to(tl.float32, bitcast=True)  # 2^(e−1) · (1 + m/2)
    mag = tl.where(e == 0, m.to(tl.float32) * 0.5, normal)
    return tl.where((c >> 3) == 1, -mag, mag)


@triton.jit
def _scale_to_f32(s, SCALE_E8M0: tl.constexpr):
    """A loaded scale tile: raw UE8M0 exponents (2^(u−127); 0 is the subnormal 2^−127, 255 NaN) or fp32."""
    if SCALE_E8M0:
        u = s.to(tl.int32)
        v = tl.where(u == 0, 0x400000, u << 23).to(tl.float32, bitcast=True)
        v = tl.where(u == 255, float("nan"), v)
    else:
        v = s
    return v


@triton.jit
def _fp8_linear_kernel(x_ptr, stride_x, w_ptr, s_ptr, y_ptr, T, N, K, KB, BN_Q, BK_Q, SCALE_E8M0: tl.constexpr,
                       BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, IEEE: tl.constexpr):
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    t_ok, n_ok = t < T, n < N
    acc = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_ok = k < K
        a = tl.load(x_ptr + t[:, None].to(tl.int64) * stride_x + k[None, :], mask=t_ok[:, None] & k_ok[None, :],
                    other=0.0)  # [BT, BK]
        wk = k_ok[:, None] & n_ok[None, :]
        b = tl.load(w_ptr + n[None, :].to(tl.int64) * K + k[:, None], mask=wk, other=0)  # [BK, BN] raw bytes
        s = tl.load(s_ptr + (n // BN_Q)[None, :] * KB + (k // BK_Q)[:, None], mask=wk, other=1.0)
        w = _e4m3_to_f32(b.to(tl.int32)) * _scale_to_f32(s, SCALE_E8M0)  # [BK, BN] fp32
        acc += dot(a, w.to(a.dtype), IEEE)
    tl.store(y_ptr + t[:, None].to(tl.int64) * N + n[None, :], acc, mask=t_ok[:, None] & n_ok[None, :])


@triton.jit
def _fp4_experts_kernel(x_ptr, stride_x, w_ptr, s_ptr, tile_expert_ptr, tile_row0_ptr, tile_rows_ptr, y_ptr, S, N,
                        K, SCALE_E8M0: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_K: tl.constexpr, IEEE: tl.constexpr):
    tile = tl.program_id(0)
    rows = tl.load(tile_rows_ptr + tile)
    if rows > 0:
        e = tl.load(tile_expert_ptr + tile).to(tl.int64)
        row = tl.load(tile_row0_ptr + tile).to(tl.int64) + tl.arange(0, BLOCK_M)
        live = (tl.arange(0, BLOCK_M) < rows) & (row < S)  # counts summing past S never write out of bounds
        n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = n < N
        half, groups = K // 2, tl.cdiv(K, 32)
        w_rows = w_ptr + e * N * half + n[None, :].to(tl.int64) * half  # [1, BN] expert rows, read transposed
        s_rows = s_ptr + e * N * groups + n[None, :].to(tl.int64) * groups
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            k_ok = k < K
            a = tl.load(x_ptr + row[:, None] * stride_x + k[None, :], mask=live[:, None] & k_ok[None, :], other=0.0)
            wk = k_ok[:, None] & n_ok[None, :]
            byte = tl.load(w_rows + (k // 2)[:, None], mask=wk, other=0).to(tl.int32) & 255  # [BK, BN]
            code = (byte >> ((k & 1) * 4)[:, None]) & 15  # even k: low nibble
            s = tl.load(s_rows + (k // 32)[:, None], mask=wk, other=1.0)
            w = _e2m1_to_f32(code) * _scale_to_f32(s, SCALE_E8M0)  # [BK, BN] fp32
            acc += dot(a, w.to(a.dtype), IEEE)
        tl.store(y_ptr + row[:, None] * N + n[None, :], acc, mask=live[:, None] & n_ok[None, :])


# ----------------------------------------------------------------------------------------------------
# Launchers and registration.

# Tile sizes from dtypes only, never from T or S (batch invariance). 16 is tl.dot's smallest M. Untuned:
# no GPU measurement yet.
_BLOCK_T = 16
_BLOCK_N, _BLOCK_K = 64, 64
# FP4: one per-32 scale group per K step; a 64-wide step decoded [64, 64] fp32 weights per program and
# spilled on Triton 3.6 (tools/kernel_check.py).
_FP4_BLOCK_K = 32


def _scale_arg(scale: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """The scale as the kernel reads it (a uint8 view of e8m0, no copy) and whether it is UE8M0."""
    if scale.dtype == torch.float8_e8m0fnu:
        return scale.view(torch.uint8), True
    return scale, scale.dtype == torch.uint8


@register("fp8_linear")
def _fp8_linear_triton(x: torch.Tensor, w_fp8: torch.Tensor, scale: torch.Tensor, block_n: int,
                       block_k: int) -> torch.Tensor:
    """x [T, K] fp32/bf16 (unit last stride), w_fp8 [N, K] float8_e4m3fn or uint8 (contiguous), scale
    [ceil(N/block_n), ceil(K/block_k)] e8m0/uint8/fp32 (contiguous) → [T, N] fp32. Meaning: `fp8_linear_ref`."""
    check_tensor("x", x, ndim=2, dtypes=X_DTYPES, unit_last=True)
    t, k = (int(v) for v in x.shape)
    check_tensor("w_fp8", w_fp8, ndim=2, dtypes=W8_DTYPES, device=x.device, contiguous=True)
    n = int(w_fp8.shape[0])
    check(w_fp8.shape[1] == k, f"w_fp8: expected [N, K={k}], got {tuple(w_fp8.shape)}")
    check(block_n > 0 and block_k > 0, f"block sizes must be positive, got ({block_n}, {block_k})")
    check_tensor("scale", scale, shape=(cdiv(n, block_n), cdiv(k, block_k)), dtypes=SCALE_DTYPES, device=x.device,
                 contiguous=True)
    s, is_e8m0 = _scale_arg(scale)
    y = torch.empty((t, n), dtype=torch.float32, device=x.device)
    launch(_fp8_linear_kernel, (cdiv(t, _BLOCK_T), cdiv(n, _BLOCK_N)), x, x.stride(0), w_fp8.view(torch.uint8), s, y,
           t, n, k, cdiv(k, block_k), block_n, block_k, SCALE_E8M0=is_e8m0, BLOCK_T=_BLOCK_T, BLOCK_N=_BLOCK_N,
           BLOCK_K=_BLOCK_K, IEEE=x.dtype == torch.float32)
    return y


def group_tiles(counts: torch.Tensor, num_rows: int, block_m: int = _BLOCK_T):
    """The grouped GEMM's work list from per-expert row counts, on the device without host reads.

    counts [E] → (tile_expert, tile_row0, tile_rows) [cdiv(S, BLOCK_M) + min(E, S)] int32: tile i covers
    rows [row0, row0 + rows) of one expert; rows = 0 marks an unused tile (a bound from shapes alone:
    every expert adds at most one partial tile).
    """
    num_experts = int(counts.shape[0])
    counts = counts.to(torch.int64)
    starts = torch.cumsum(counts, 0) - counts  # [E] first row of each expert
    tiles = (counts + block_m - 1) // block_m  # [E]
    tile_end = torch.cumsum(tiles, 0)  # [E]
    i = torch.arange(cdiv(num_rows, block_m) + min(num_experts, num_rows), device=counts.device)
    e = torch.searchsorted(tile_end, i, right=True)  # [tiles] E past the last tile
    used = e < num_experts
    ec = e.clamp(max=num_experts - 1)
    j = i - (tile_end[ec] - tiles[ec])  # the tile's index within its expert
    rows = torch.where(used, (counts[ec] - j * block_m).clamp(max=block_m), 0)
    row0 = torch.where(used, starts[ec] + j * block_m, 0)
    return ec.to(torch.int32), row0.to(torch.int32), rows.to(torch.int32)


@register("fp4_experts")
def _fp4_experts_triton(x: torch.Tensor, w_fp4: torch.Tensor, scale: torch.Tensor, counts: torch.Tensor
                        ) -> torch.Tensor:
    """x [S, K] fp32/bf16 (unit last stride), w_fp4 [E, N, K/2] int8/uint8, scale [E, N, ceil(K/32)]
    e8m0/uint8/fp32, counts [E] int32/int64 (all contiguous) → [S, N] fp32. Meaning: `fp4_experts_ref`."""
    check_tensor("x", x, ndim=2, dtypes=X_DTYPES, unit_last=True)
    s_rows, k = (int(v) for v in x.shape)
    check(k % 2 == 0, f"x: K = {k} must be even (two FP4 values per byte)")
    check_tensor("w_fp4", w_fp4, ndim=3, dtypes=W4_DTYPES, device=x.device, contiguous=True)
    num_experts, n = (int(v) for v in w_fp4.shape[:2])
    check(w_fp4.shape[2] == k // 2, f"w_fp4: expected [E, N, K/2 = {k // 2}], got {tuple(w_fp4.shape)}")
    check(num_experts > 0, "w_fp4: no experts")
    check_tensor("scale", scale, shape=(num_experts, n, cdiv(k, FP4_BLOCK)), dtypes=SCALE_DTYPES, device=x.device,
                 contiguous=True)
    check_tensor("counts", counts, shape=(num_experts,), dtypes=INDEX_DTYPES, device=x.device)
    s, is_e8m0 = _scale_arg(scale)
    tile_expert, tile_row0, tile_rows = group_tiles(counts, s_rows)
    y = torch.zeros((s_rows, n), dtype=torch.float32, device=x.device)  # padding rows stay 0
    launch(_fp4_experts_kernel, (int(tile_rows.shape[0]), cdiv(n, _BLOCK_N)), x, x.stride(0), w_fp4.view(torch.uint8),
           s, tile_expert, tile_row0, tile_rows, y, s_rows, n, k, SCALE_E8M0=is_e8m0, BLOCK_M=_BLOCK_T,
           BLOCK_N=_BLOCK_N, BLOCK_K=_FP4_BLOCK_K, IEEE=x.dtype == torch.float32)
    return y


# ----------------------------------------------------------------------------------------------------
# The public ops: kernels "ref" → reference, "triton" → kernel, "auto" → kernel on CUDA inputs.


def fp8_linear(x: torch.Tensor, w_fp8: torch.Tensor, scale: torch.Tensor, block: tuple[int, int] = (128, 128), *,
               kernels: str = "auto") -> torch.Tensor:
    """x · dequant(w_fp8, scale)ᵀ → [T, N] fp32; see `fp8_linear_ref`."""
    bn, bk = (int(b) for b in block)
    if use_triton(kernels, x, w_fp8, scale):
        return _fp8_linear_triton(x, w_fp8, scale, bn, bk)
    return fp8_linear_ref(x, w_fp8, scale, (bn, bk))


def fp4_experts(x: torch.Tensor, w_fp4: torch.Tensor, scale: torch.Tensor, counts: torch.Tensor, *,
                kernels: str = "auto") -> torch.Tensor:
    """Grouped x · dequant(w_fp4[e], scale[e])ᵀ over expert row groups → [S, N] fp32; see `fp4_experts_ref`."""
    if use_triton(kernels, x, w_fp4, scale, counts):
        return _fp4_experts_triton(x, w_fp4, scale, counts)
    return fp4_experts_ref(x, w_fp4, scale, counts)


