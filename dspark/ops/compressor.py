"""Window pooling of the V4 KV compressors (HCA, CSA and the indexer's own compressor).

Layouts: `...` leading dims (batch, windows), P pooled slots (m for HCA, 2m for CSA), C channels.

    kv    [..., P, C]   raw kv projections of the slots (model dtype)
    gate  [..., P, C]   gate projections + position bias (fp32); −inf marks an empty slot
    out   [..., C]      Σ_p softmax_p(gate)[p, c] · kv[p, c], softmax over slots per channel, fp32

Every window has at least one finite slot, so the softmax is always defined (a channel whose slots are
all −inf gives NaN, as torch.softmax does). Empty slots weigh exactly 0 but their kv still enters as
0 · kv: keep it finite (the model writes 0 there).

Kernel (`_compress_windows_kernel`): one program per (window, block of BLOCK_C channels) holds all P
slots of its channels in registers ([BLOCK_P, BLOCK_C], BLOCK_P = next_pow2(P)) and evaluates the
reference's formula step for step: max over slots, exp(gate − max), sum, weights = e / sum, Σ weights ·
kv, in fp32 from model-dtype loads. Against the reference the result agrees to fp32 tolerance (exp
implementation, summation order). Batch invariance: tile sizes depend on (P, C) only and each slot
reduction is one fixed-shape `tl.sum`, so a window's entry is bit-identical whatever else is pooled.
TODO(#7): fuse kv_norm and the compress RoPE into the store (the entry is complete in registers once
all channels are; needs BLOCK_C = C).
"""

from __future__ import annotations

import math

import torch

from dspark.ops._launch import (FLOAT_DTYPES, cdiv, check, check_tensor, launch, next_pow2, register, tl, triton,
                                use_triton)


def compress_windows_ref(kv: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    weights = torch.softmax(gate.float(), dim=-2)
    return (weights * kv.float()).sum(dim=-2)


# ----------------------------------------------------------------------------------------------------
# Triton kernel.


@triton.jit
def _compress_windows_kernel(kv_ptr, stride_kn, stride_kp, gate_ptr, stride_gn, stride_gp, out_ptr, P, C,
                             BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    n = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    p = tl.arange(0, BLOCK_P)
    ok = (p < P)[:, None] & (c < C)[None, :]
    gate = tl.load(gate_ptr + n * stride_gn + p[:, None] * stride_gp + c[None, :], mask=ok,
                   other=-float("inf")).to(tl.float32)  # [BLOCK_P, BLOCK_C]; padded slots are empty
    gate = tl.where((c < C)[None, :], gate, 0.0)  # padded channels: finite, no −inf − (−inf)
    kv = tl.load(kv_ptr + n * stride_kn + p[:, None] * stride_kp + c[None, :], mask=ok, other=0.0).to(tl.float32)
    top = tl.max(gate, axis=0)  # [BLOCK_C]
    e = tl.exp(gate - top[None, :])
    weights = e / tl.sum(e, axis=0)[None, :]
    out = tl.sum(weights * kv, axis=0)
    tl.store(out_ptr + n * C + c, out, mask=c < C)


# ----------------------------------------------------------------------------------------------------
# Launcher and registration.

_MAX_P = 4096
_TILE = 4096  # fp32 elements per [BLOCK_P, BLOCK_C] tile: 32 registers per thread for each of gate and kv


def _config(p: int, c: int) -> tuple[int, int]:
    """(BLOCK_P, BLOCK_C) from (P, C) only (batch invariance): every slot in one tile, channels filling
    the rest of a 4k-element tile, at most 128. CSA (P = 8): 8 × 128; HCA (P = 128): 128 × 32. Untuned."""
    block_p = next_pow2(p)
    return block_p, max(1, min(_TILE // block_p, 128, next_pow2(c)))


def _flat_windows(x: torch.Tensor, name: str) -> torch.Tensor:
    """[..., P, C] with unit channel stride → a [N, P, C] view (no copy; raises otherwise)."""
    check_tensor(name, x, dtypes=FLOAT_DTYPES, unit_last=True)
    check(x.dim() >= 2, f"{name}: expected [..., P, C], got shape {tuple(x.shape)}")
    try:
        return x.view(math.prod(x.shape[:-2]), x.shape[-2], x.shape[-1])
    except RuntimeError as err:
        raise ValueError(f"{name}: leading dims of strides {x.stride()} do not flatten without a copy") from err


@register("compress_windows")
def _compress_windows_triton(kv: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """kv, gate [..., P, C] (fp32/fp16/bf16 each, unit last stride, leading dims flattenable without a copy)
    → [..., C] fp32, contiguous. Meaning: `compress_windows_ref`."""
    x = _flat_windows(kv, "kv")
    check_tensor("gate", gate, shape=kv.shape, device=kv.device)
    g = _flat_windows(gate, "gate")
    n, p, c = (int(s) for s in x.shape)
    check(1 <= p <= _MAX_P, f"slot count {p} outside [1, {_MAX_P}]")
    out = torch.empty(tuple(kv.shape[:-2]) + (c,), dtype=torch.float32, device=kv.device)
    block_p, block_c = _config(p, c)
    launch(_compress_windows_kernel, (n, cdiv(c, block_c)), x, x.stride(0), x.stride(1), g, g.stride(0), g.stride(1),
           out, p, c, BLOCK_P=block_p, BLOCK_C=block_c)
    return out


# ----------------------------------------------------------------------------------------------------
# The public op: kernels "ref" → reference, "triton" → kernel, "auto" → kernel on CUDA inputs.


def compress_windows(kv, gate, *, kernels: str = "auto"):
    """One pooled entry per window → [..., C] fp32; see `compress_windows_ref`."""
    if use_triton(kernels, kv, gate):
        return _compress_windows_triton(kv, gate)
    return compress_windows_ref(kv, gate)
