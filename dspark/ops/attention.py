"""Attention over V4's single shared latent K=V head, with per-head sinks.

Layouts (named dims, style.md §3): T query tokens, H heads, D head dim, S key slots per query,
P rows of a flat KV pool, B batch (dense op only).

Sparse op (`sparse_sink_attention`): keys are read by index from a flat pool, so a caller never
materialises per-query key copies.

    q       [T, H, D]   queries (already normed and roped), fp32 / fp16 / bf16
    pool    [P, D]      key rows in q's dtype; the same row is the value (MQA with K = V). A pool may
                        be a list of up to three tensors [P_i, D], addressed as their concatenation
                        (P = Σ P_i) without building it: the model's keys live in three places (the
                        window ring, this forward's new rows, the paged entry pool).
    index   [T, S]      int32 / int64 pool row of slot s of query t; a slot is valid iff 0 ≤ index < P,
                        any other value (−1 by convention) masks it. Duplicates count once per slot.
    sinks   [H]         one extra logit per head, fp32, unscaled, never masked, finite
    out     [T, H, D]   in q's dtype

Dense op (`sink_attention`): the same attention with keys per batch row and a boolean mask.

    q [B, T, H, D], kv [B, S, D], allowed [B, T, S] bool (True where query t may read row s) → [B, T, H, D]

Semantics (both ops): for query t and head h the logits are (q[t,h] · k_s) · scale over the valid
slots, plus sinks[h]; p = softmax over [logits ; sink] in fp32; the sink's probability is dropped, so
kept probabilities sum to < 1; out[t,h] = Σ_s p[t,h,s] · k_s (K = V). A query with no valid slot
attends to the sink only and returns exactly zero, never NaN. Pool rows that no valid slot references
(and, for the dense op, kv rows that no query may read) may hold NaN / inf: they never reach an output.

Kernel (`_sparse_sink_attention_kernel`): one program per (query t, block of BLOCK_H heads). It keeps
q [BLOCK_H, D] in registers and walks the query's slots in tiles of BLOCK_S in index order: gather the
tile's key rows once ([BLOCK_S, D], masked slots read nothing; each row from the pool part that
holds it) and use them for every head of the block,
scores = q·kᵀ (tl.dot, fp32 accumulation), an online softmax in the log2 domain whose running max and
denominator start at the sink (so an empty row ends as 0 / 1 = 0), then acc += p·k. Tiles with no
valid slot are skipped (bit-exact: such a tile would rescale by exp2(0) = 1 and add zeros).

Numerics. Scores, softmax and accumulation run in fp32; the operands of both dots are in the input
dtype (fp32 dots at IEEE precision, never TF32), and p is cast to that dtype for the p·V dot, as HF's
eager attention casts probabilities to the value dtype (deepseek_v4.md §3). Against the fp32 reference
fp32 agrees to fp32 tolerance (summation order, exp2 vs exp, online rescaling); fp16 / bf16 differ in
addition by p's rounding, at most u·max|k| absolutely (u = 2^-11 / 2^-8).

Batch invariance (architecture.md §9): tile sizes depend on (H, D) only, each program reads only its
own query's row of `index`, and the reduction over s runs in a fixed order (tiles in index order, fixed
shape dots and sums, no split-K, no atomics), so a query's output is bit-identical whatever T is, which
other queries are in flight, what unreferenced pool rows hold, and how many trailing masked slots pad S.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from dspark.ops._launch import (FLOAT_DTYPES, INDEX_DTYPES, cdiv, check, check_tensor, dot, launch, next_pow2,
                                register, tl, triton, use_triton)

_LOG2E = math.log2(math.e)


def _pool_parts(pool: torch.Tensor | Sequence[torch.Tensor]) -> list[torch.Tensor]:
    parts = [pool] if isinstance(pool, torch.Tensor) else list(pool)
    check(1 <= len(parts) <= _MAX_PARTS, f"pool: 1 to {_MAX_PARTS} tensors, got {len(parts)}")
    return parts


def sparse_sink_attention_ref(q: torch.Tensor, pool: torch.Tensor | Sequence[torch.Tensor], index: torch.Tensor,
                              sinks: torch.Tensor, scale: float) -> torch.Tensor:
    t, h, d = q.shape
    keys = q.new_zeros(*index.shape, d, dtype=torch.float32)  # [T, S, D]
    start = 0
    for part in _pool_parts(pool):  # gather each part's rows; the concatenation is never built
        n = part.shape[0]
        mine = (index >= start) & (index < start + n)  # [T, S]
        if n:
            rows = torch.where(mine, index - start, 0).long()
            # Masked slots stay zero before any product: a slot's stand-in row may hold NaN / inf.
            keys = torch.where(mine.unsqueeze(-1), part[rows].float(), keys)
        start += n
    valid = (index >= 0) & (index < start)  # [T, S]
    logits = torch.einsum("thd,tsd->ths", q.float(), keys) * scale  # [T, H, S]
    logits = logits.masked_fill(~valid.unsqueeze(1), float("-inf"))
    sink = sinks.float().view(1, h, 1).expand(t, h, 1)  # [T, H, 1]
    probs = torch.softmax(torch.cat([logits, sink], dim=-1), dim=-1)[..., :-1]  # [T, H, S]
    out = torch.einsum("ths,tsd->thd", probs, keys)  # [T, H, D]
    return out.to(q.dtype)


def sink_attention_ref(q: torch.Tensor, kv: torch.Tensor, allowed: torch.Tensor, sinks: torch.Tensor,
                       scale: float) -> torch.Tensor:
    qf = q.float()
    # Rows no query may read are zeroed (they may be stale or garbage); a row some query reads is a key.
    kvf = torch.where(allowed.any(1).unsqueeze(-1), kv.float(), 0.0)  # [B, S, D]
    logits = torch.einsum("bthd,bsd->bhts", qf, kvf) * scale  # [B, H, T, S]
    logits = logits.masked_fill(~allowed[:, None], float("-inf"))
    sink = sinks.float().view(1, -1, 1, 1).expand(*logits.shape[:3], 1)  # [B, H, T, 1]
    probs = torch.softmax(torch.cat([logits, sink], dim=-1), dim=-1)[..., :-1]  # [B, H, T, S]
    out = torch.einsum("bhts,bsd->bthd", probs, kvf)  # [B, T, H, D]
    return out.to(q.dtype)


# ----------------------------------------------------------------------------------------------------
# Triton kernel.


@triton.jit
def _sparse_sink_attention_kernel(q_ptr, stride_qt, stride_qh, pool_ptr, stride_p, P0, pool1_ptr, stride_p1, P1,
                                  pool2_ptr, stride_p2, P2, index_ptr, stride_it, sinks_ptr, out_ptr, H, D, S,
                                  qk_scale, PARTS: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_S: tl.constexpr,
                                  BLOCK_D: tl.constexpr, IEEE: tl.constexpr):
    """out[t, h] for one query t and heads h0 … h0+BLOCK_H−1; qk_scale = scale·log2(e). The pool is the
    concatenation of PARTS tensors of P0, P1, P2 rows."""
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    h_ok = h < H
    d = tl.arange(0, BLOCK_D)
    d_ok = d < D
    q = tl.load(q_ptr + t * stride_qt + h[:, None] * stride_qh + d[None, :], mask=h_ok[:, None] & d_ok[None, :],
                other=0.0)  # [BLOCK_H, BLOCK_D]
    # Running max and denominator start at the sink, which is never masked: m stays finite, an empty
    # row ends as 0 / 1.
    m = tl.load(sinks_ptr + h, mask=h_ok, other=0.0) * 1.4426950408889634  # [BLOCK_H], log2 domain
    den = tl.full([BLOCK_H], 1.0, tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_D], dtype=tl.float32)
    for s0 in range(0, S, BLOCK_S):  # fixed order: tiles in index order
        s = s0 + tl.arange(0, BLOCK_S)
        row = tl.load(index_ptr + t * stride_it + s, mask=s < S, other=-1).to(tl.int64)  # [BLOCK_S]
        valid = (row >= 0) & (row < P0 + P1 + P2)
        if tl.max(valid.to(tl.int32), axis=0) > 0:
            # [BLOCK_S, BLOCK_D], the tile's keys = values, read once for all heads; each row from its part
            in0 = valid & (row < P0)
            k = tl.load(pool_ptr + row[:, None] * stride_p + d[None, :], mask=in0[:, None] & d_ok[None, :],
                        other=0.0)
            if PARTS > 1:
                r1 = row - P0
                in1 = valid & (r1 >= 0) & (r1 < P1)
                k1 = tl.load(pool1_ptr + r1[:, None] * stride_p1 + d[None, :], mask=in1[:, None] & d_ok[None, :],
                             other=0.0)
                k = tl.where(in1[:, None], k1, k)
            if PARTS > 2:
                r2 = row - P0 - P1
                in2 = valid & (r2 >= 0)
                k2 = tl.load(pool2_ptr + r2[:, None] * stride_p2 + d[None, :], mask=in2[:, None] & d_ok[None, :],
                             other=0.0)
                k = tl.where(in2[:, None], k2, k)
            logits = tl.where(valid[None, :], dot(q, tl.trans(k), IEEE) * qk_scale, -float("inf"))
            m_new = tl.maximum(m, tl.max(logits, axis=1))
            alpha = tl.exp2(m - m_new)
            p = tl.exp2(logits - m_new[:, None])  # [BLOCK_H, BLOCK_S]; masked slots exactly 0
            den = den * alpha + tl.sum(p, axis=1)
            acc = acc * alpha[:, None] + dot(p.to(pool_ptr.dtype.element_ty), k, IEEE)
            m = m_new
    out = acc / den[:, None]
    tl.store(out_ptr + (t * H + h[:, None]) * D + d[None, :], out.to(out_ptr.dtype.element_ty),
             mask=h_ok[:, None] & d_ok[None, :])


# ----------------------------------------------------------------------------------------------------
# Launcher and registration.

_BLOCK_S = 32  # key slots per tile; untuned (no GPU measurement yet)
_MAX_D = 1024
_MAX_PARTS = 3


def _config(h: int, d: int, elem_bytes: int) -> tuple[int, int, int]:
    """(BLOCK_H, BLOCK_D, num_warps) from (H, D, dtype) only, never from T or S (batch invariance).

    tl.dot needs every dim ≥ 16. The fp32 accumulator [BLOCK_H, BLOCK_D] is capped at 16k elements for
    16-bit inputs (64 registers per thread at 8 warps): D = 512 → 32 heads per program, so V4-Flash
    (H = 64) runs two head blocks per query and V4-Pro (H = 128) four. fp32 inputs (tests; IEEE dots on
    CUDA cores) take half the heads to keep their doubled operand tiles in shared memory.
    Untuned (no GPU measurement yet)."""
    block_d = max(16, next_pow2(d))
    budget = 16384 if elem_bytes <= 2 else 8192
    block_h = max(16, min(next_pow2(h), 64, budget // block_d))
    return block_h, block_d, 8 if block_d >= 256 else 4


@register("sparse_sink_attention")
def _sparse_sink_attention_triton(q: torch.Tensor, pool: list[torch.Tensor], index: torch.Tensor,
                                  sinks: torch.Tensor, scale: float) -> torch.Tensor:
    """q [T, H, D] (fp32/fp16/bf16, unit last stride), pool 1–3 tensors [P_i, D] (q's dtype, unit last
    stride), index [T, S] (int32/int64, unit last stride), sinks [H] fp32 contiguous → [T, H, D] in q's
    dtype, contiguous. Meaning: `sparse_sink_attention_ref`."""
    check_tensor("q", q, ndim=3, dtypes=FLOAT_DTYPES, unit_last=True)
    t, h, d = (int(s) for s in q.shape)
    check(1 <= d <= _MAX_D, f"head dim {d} outside [1, {_MAX_D}]")
    dev = q.device
    parts = _pool_parts(pool)
    for i, part in enumerate(parts):
        check_tensor(f"pool[{i}]", part, ndim=2, dtypes=(q.dtype,), device=dev, unit_last=True)
        check(part.shape[1] == d, f"pool[{i}]: rows of {part.shape[1]} channels, q has head dim {d}")
    check_tensor("index", index, ndim=2, dtypes=INDEX_DTYPES, device=dev, unit_last=True)
    check(index.shape[0] == t, f"index: {index.shape[0]} rows for {t} queries")
    check_tensor("sinks", sinks, shape=(h,), dtypes=(torch.float32,), device=dev, contiguous=True)
    s = int(index.shape[1])
    out = torch.empty((t, h, d), dtype=q.dtype, device=dev)
    block_h, block_d, warps = _config(h, d, q.element_size())
    padded = parts + [parts[0].new_empty(0, d)] * (_MAX_PARTS - len(parts))  # absent parts: 0 rows, never read
    pool_args = [a for part in padded for a in (part, part.stride(0), int(part.shape[0]))]
    launch(_sparse_sink_attention_kernel, (t, cdiv(h, block_h)), q, q.stride(0), q.stride(1), *pool_args,
           index, index.stride(0), sinks, out, h, d, s, float(scale) * _LOG2E, PARTS=len(parts), BLOCK_H=block_h,
           BLOCK_S=_BLOCK_S, BLOCK_D=block_d, IEEE=q.dtype == torch.float32, num_warps=warps)
    return out


def _view(x: torch.Tensor, shape: tuple[int, ...], name: str) -> torch.Tensor:
    try:
        return x.view(shape)
    except RuntimeError as err:
        raise ValueError(f"{name}: strides {x.stride()} do not flatten to {shape} without a copy") from err


# ----------------------------------------------------------------------------------------------------
# The public ops: kernels "ref" → reference, "triton" → kernel, "auto" → kernel on CUDA inputs.


def sparse_sink_attention(q, pool, index, sinks, scale: float, *, kernels: str = "auto"):
    """Attention of q [T, H, D] over the pool rows `index` [T, S] names → [T, H, D]; `pool` is a tensor or a
    list of up to three (their concatenation); see `sparse_sink_attention_ref`."""
    parts = _pool_parts(pool)
    if use_triton(kernels, q, *parts, index, sinks):
        return _sparse_sink_attention_triton(q, parts, index, sinks, float(scale))
    return sparse_sink_attention_ref(q, pool, index, sinks, scale)


def sink_attention(q, kv, allowed, sinks, scale: float, *, kernels: str = "auto"):
    """Dense-mask attention, shapes in the module docstring; meaning: `sink_attention_ref`.

    The kernel path is `sparse_sink_attention` over kv flattened to a [B·S, D] pool with
    index[b·T + t, s] = b·S + s where allowed, else −1 (q and kv must flatten without a copy)."""
    if not use_triton(kernels, q, kv, allowed, sinks):
        return sink_attention_ref(q, kv, allowed, sinks, scale)
    check_tensor("q", q, ndim=4)
    b, t, h, d = (int(s) for s in q.shape)
    check_tensor("kv", kv, ndim=3, device=q.device)
    s = int(kv.shape[1])
    check(tuple(kv.shape) == (b, s, d), f"kv: expected [B={b}, S, D={d}], got {tuple(kv.shape)}")
    check_tensor("allowed", allowed, shape=(b, t, s), dtypes=(torch.bool,), device=q.device)
    idx_dtype = torch.int32 if b * s < 2 ** 31 else torch.int64
    rows = torch.arange(b * s, dtype=idx_dtype, device=q.device).view(b, 1, s)  # [B, 1, S]
    index = torch.where(allowed, rows, -1).view(b * t, s)  # [B·T, S]
    out = _sparse_sink_attention_triton(_view(q, (b * t, h, d), "q"), [_view(kv, (b * s, d), "kv")], index, sinks,
                                        float(scale))
    return out.view(b, t, h, d)
