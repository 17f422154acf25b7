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
q [BLOCK_H, D] in registers and walks the query's slots in tiles of BLOCK_S in index order. For each tile
with a valid slot it gathers the tile's key rows once ([BLOCK_S, D], masked slots read nothing; each row
from the pool part that holds it) and uses them for every head of the block: the tile's partial state
(m_j = max of its logits in the log2 domain, den_j = Σ 2^(logit − m_j), acc_j = p·k, tl.dot with fp32
accumulation) is merged into a running state that starts at the sink (so an empty row ends as 0 / 1 = 0):
m = max(m, m_j), den = den·2^(m_old − m) + den_j·2^(m_j − m), likewise acc, as explicit FMAs. Tiles with no
valid slot are skipped (merging one would be an exact no-op).

Split keys (flash-decoding, `split_keys`): when T × head blocks fills at most 1/16 of the SMs (decode: at
T = 1 V4-Flash has 2 head blocks), the same kernel runs with SPLIT, one program per (t, head block, tile)
writing the tile's partial (m_j, den_j, acc_j) to an fp32 workspace, and `_sparse_sink_combine_kernel`
merges a query's partials from the sink in tile order with the same `merge_partials`. The partials are the same
values the fused kernel computes and the merges the same operations in the same order, so both paths
give the same bits.

Numerics. Scores, softmax and accumulation run in fp32; the operands of both dots are in the input
dtype (fp32 dots at IEEE precision, never TF32), and p is cast to that dtype for the p·V dot, as HF's
eager attention casts probabilities to the value dtype (deepseek_v4.md §3). Against the fp32 reference
fp32 agrees to fp32 tolerance (summation order, exp2 vs exp, online rescaling); fp16 / bf16 differ in
addition by p's rounding, at most u·max|k| absolutely (u = 2^-11 / 2^-8).

Batch invariance (architecture.md §9): tile sizes depend on (H, D) only, each program reads only its
own query's row of `index`, and the reduction over s runs in a fixed order (tiles in index order, merged
one at a time from the sink, fixed-shape dots and sums, no atomics), in the fused and split paths alike, so
a query's output is bit-identical whatever T is (and so whichever path T picks), which other queries are in
flight, what unreferenced pool rows hold, and how many trailing masked slots pad S.
"""

from __future__ import annotations

import functools
import math
from typing import Optional, Sequence

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
def _tile_partial(q, row, valid, pool_ptr, stride_p, P0, pool1_ptr, stride_p1, P1, pool2_ptr, stride_p2, d, d_ok,
                  qk_scale, PARTS: tl.constexpr, IEEE: tl.constexpr):
    """One key tile's partial softmax state for a block of heads, starting from nothing: (m [BLOCK_H], the
    log2-domain max of the valid logits; den [BLOCK_H] = Σ 2^(logit − m); acc [BLOCK_H, BLOCK_D] = Σ p·k).
    The tile must hold a valid slot (m finite)."""
    # [BLOCK_S, BLOCK_D], the tile's keys = values, read once for all heads; each row from its part
    in0 = valid & (row < P0)
    k = tl.load(pool_ptr + row[:, None] * stride_p + d[None, :], mask=in0[:, None] & d_ok[None, :], other=0.0)
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
    m = tl.max(logits, axis=1)
    p = tl.exp2(logits - m[:, None])  # [BLOCK_H, BLOCK_S]; masked slots exactly 0
    return m, tl.sum(p, axis=1), dot(p.to(pool_ptr.dtype.element_ty), k, IEEE)


@triton.jit
def merge_partials(m, den, acc, m_j, den_j, acc_j):
    """The running state (m, den, acc) ⊕ one tile's partial. Explicit FMAs, so the fused kernel and the
    split kernel's combine round alike (no contraction left to the compiler)."""
    m_new = tl.maximum(m, m_j)
    a = tl.exp2(m - m_new)
    b = tl.exp2(m_j - m_new)  # 0 for a tile with nothing valid (m_j = −inf): an exact no-op
    den = tl.fma(den_j, b, den * a)
    acc = tl.fma(acc_j, b[:, None], acc * a[:, None])
    return m_new, den, acc


@triton.jit
def _sparse_sink_attention_kernel(q_ptr, stride_qt, stride_qh, pool_ptr, stride_p, P0, pool1_ptr, stride_p1, P1,
                                  pool2_ptr, stride_p2, P2, index_ptr, stride_it, sinks_ptr, out_ptr, ws_m_ptr,
                                  ws_den_ptr, ws_acc_ptr, H, D, S, N_TILES, qk_scale, PARTS: tl.constexpr,
                                  BLOCK_H: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
                                  IEEE: tl.constexpr, SPLIT: tl.constexpr):
    """Fused (SPLIT False): out[t, h] for one query t and heads h0 … h0+BLOCK_H−1, merging the tiles in index
    order into a state that starts at the sink. SPLIT: program (t, head block, j) writes tile j's partial to
    the workspace ws_m, ws_den [T, N_TILES, H] and ws_acc [T, N_TILES, H, D] (fp32; m = −inf marks a tile with
    nothing valid, whose den / acc are left unwritten); `_sparse_sink_combine_kernel` merges them.
    qk_scale = scale·log2(e). The pool is the concatenation of PARTS tensors of P0, P1, P2 rows."""
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    h_ok = h < H
    d = tl.arange(0, BLOCK_D)
    d_ok = d < D
    q = tl.load(q_ptr + t * stride_qt + h[:, None] * stride_qh + d[None, :], mask=h_ok[:, None] & d_ok[None, :],
                other=0.0)  # [BLOCK_H, BLOCK_D]
    if SPLIT:
        j = tl.program_id(2).to(tl.int64)
        s = j * BLOCK_S + tl.arange(0, BLOCK_S)
        row = tl.load(index_ptr + t * stride_it + s, mask=s < S, other=-1).to(tl.int64)  # [BLOCK_S]
        valid = (row >= 0) & (row < P0 + P1 + P2)
        ws = (t * N_TILES + j) * H + h  # [BLOCK_H]
        if tl.max(valid.to(tl.int32), axis=0) > 0:
            m_j, den_j, acc_j = _tile_partial(q, row, valid, pool_ptr, stride_p, P0, pool1_ptr, stride_p1, P1,
                                              pool2_ptr, stride_p2, d, d_ok, qk_scale, PARTS, IEEE)
            tl.store(ws_m_ptr + ws, m_j, mask=h_ok)
            tl.store(ws_den_ptr + ws, den_j, mask=h_ok)
            tl.store(ws_acc_ptr + ws[:, None] * D + d[None, :], acc_j, mask=h_ok[:, None] & d_ok[None, :])
        else:
            tl.store(ws_m_ptr + ws, tl.full([BLOCK_H], -float("inf"), tl.float32), mask=h_ok)
    else:
        # The state starts at the sink, which is never masked: m stays finite, an empty row ends as 0 / 1.
        m = tl.load(sinks_ptr + h, mask=h_ok, other=0.0) * 1.4426950408889634  # [BLOCK_H], log2 domain
        den = tl.full([BLOCK_H], 1.0, tl.float32)
        acc = tl.zeros([BLOCK_H, BLOCK_D], dtype=tl.float32)
        for s0 in range(0, S, BLOCK_S):  # fixed order: tiles in index order
            s = s0 + tl.arange(0, BLOCK_S)
            row = tl.load(index_ptr + t * stride_it + s, mask=s < S, other=-1).to(tl.int64)  # [BLOCK_S]
            valid = (row >= 0) & (row < P0 + P1 + P2)
            if tl.max(valid.to(tl.int32), axis=0) > 0:
                m_j, den_j, acc_j = _tile_partial(q, row, valid, pool_ptr, stride_p, P0, pool1_ptr, stride_p1, P1,
                                                  pool2_ptr, stride_p2, d, d_ok, qk_scale, PARTS, IEEE)
                m, den, acc = merge_partials(m, den, acc, m_j, den_j, acc_j)
        out = acc / den[:, None]
        tl.store(out_ptr + (t * H + h[:, None]) * D + d[None, :], out.to(out_ptr.dtype.element_ty),
                 mask=h_ok[:, None] & d_ok[None, :])


@triton.jit
def _sparse_sink_combine_kernel(ws_m_ptr, ws_den_ptr, ws_acc_ptr, sinks_ptr, out_ptr, H, D, N_TILES,
                                BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    """The split path's second step: merge the N_TILES partials of query t in tile order, from the sink, with
    the fused kernel's `merge_partials` (so both paths give the same bits)."""
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    h_ok = h < H
    d = tl.arange(0, BLOCK_D)
    d_ok = d < D
    m = tl.load(sinks_ptr + h, mask=h_ok, other=0.0) * 1.4426950408889634
    den = tl.full([BLOCK_H], 1.0, tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_D], dtype=tl.float32)
    for j in range(0, N_TILES):  # fixed order: tiles in index order
        ws = (t * N_TILES + j) * H + h
        m_j = tl.load(ws_m_ptr + ws, mask=h_ok, other=-float("inf"))
        if tl.max(m_j, axis=0) > -float("inf"):  # the fused kernel skips the same tiles
            den_j = tl.load(ws_den_ptr + ws, mask=h_ok, other=0.0)
            acc_j = tl.load(ws_acc_ptr + ws[:, None] * D + d[None, :], mask=h_ok[:, None] & d_ok[None, :],
                            other=0.0)
            m, den, acc = merge_partials(m, den, acc, m_j, den_j, acc_j)
    out = acc / den[:, None]
    tl.store(out_ptr + (t * H + h[:, None]) * D + d[None, :], out.to(out_ptr.dtype.element_ty),
             mask=h_ok[:, None] & d_ok[None, :])


# ----------------------------------------------------------------------------------------------------
# Launcher and registration.

_BLOCK_S = 32  # key slots per tile; untuned (no GPU measurement yet)
_MAX_D = 1024
_MAX_PARTS = 3


def head_block_config(h: int, d: int, elem_bytes: int) -> tuple[int, int, int]:
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


# Split the key range across programs (flash-decoding) while the fused grid T × head blocks fills at most a
# sixteenth of the SMs. tools/kernel_check.py, V4-Flash at T = 1 (H 64 → 2 head blocks, S = 640 = 20 tiles):
# fused, 2 programs on a 132-SM H100 (1.5% of the machine reading the keys); split, 2 × 20 tile programs plus
# a 2-program combine. The price: each tile's partial is H·D fp32 written and read back (4·H/BLOCK_S = 8× the
# tile's bf16 key bytes at H = 64, mostly in L2), so the split pays only while the fused grid is tiny
# (T ≤ 4 for V4-Flash). Untuned (no GPU measurement yet). Both paths give the same bits (module docstring),
# so the choice, which depends on T, keeps batch invariance.
_DEFAULT_SMS = 132  # H100 SXM; used when the device cannot be asked (fake tensors, the interpreter)
_SPLIT_MAX_FILL = 16  # split while T × head blocks ≤ SMs / this


@functools.lru_cache(maxsize=None)
def sm_count(device: torch.device) -> int:
    if device.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_properties(device).multi_processor_count
    return _DEFAULT_SMS


def split_keys(t: int, head_blocks: int, n_tiles: int, device: torch.device) -> bool:
    """Whether the split path runs: a key tile per program when the fused grid fills ≤ 1/16 of the SMs."""
    return n_tiles > 1 and _SPLIT_MAX_FILL * t * head_blocks <= sm_count(device)


@register("sparse_sink_attention")
def _sparse_sink_attention_triton(q: torch.Tensor, pool: list[torch.Tensor], index: torch.Tensor,
                                  sinks: torch.Tensor, scale: float, split: Optional[bool] = None) -> torch.Tensor:
    """q [T, H, D] (fp32/fp16/bf16, unit last stride), pool 1–3 tensors [P_i, D] (q's dtype, unit last
    stride), index [T, S] (int32/int64, unit last stride), sinks [H] fp32 contiguous → [T, H, D] in q's
    dtype, contiguous. split: force the split (True) or fused (False) path; None picks by `split_keys`. The
    two give identical bits. Meaning: `sparse_sink_attention_ref`."""
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
    block_h, block_d, warps = head_block_config(h, d, q.element_size())
    head_blocks, n_tiles = cdiv(h, block_h), cdiv(s, _BLOCK_S)
    if split is None:
        split = split_keys(t, head_blocks, n_tiles, dev)
    split = bool(split) and n_tiles > 0
    padded = parts + [parts[0].new_empty(0, d)] * (_MAX_PARTS - len(parts))  # absent parts: 0 rows, never read
    pool_args = [a for part in padded for a in (part, part.stride(0), int(part.shape[0]))]
    if split:  # per-tile partials [T, N_TILES, H(, D)] fp32
        ws_m = torch.empty((t, n_tiles, h), dtype=torch.float32, device=dev)
        ws_den = torch.empty((t, n_tiles, h), dtype=torch.float32, device=dev)
        ws_acc = torch.empty((t, n_tiles, h, d), dtype=torch.float32, device=dev)
    else:
        ws_m = ws_den = ws_acc = sinks  # stand-ins, never dereferenced
    common = dict(PARTS=len(parts), BLOCK_H=block_h, BLOCK_S=_BLOCK_S, BLOCK_D=block_d,
                  IEEE=q.dtype == torch.float32, num_warps=warps)
    launch(_sparse_sink_attention_kernel, (t, head_blocks, n_tiles) if split else (t, head_blocks), q, q.stride(0),
           q.stride(1), *pool_args, index, index.stride(0), sinks, out, ws_m, ws_den, ws_acc, h, d, s, n_tiles,
           float(scale) * _LOG2E, SPLIT=split, **common)
    if split:
        launch(_sparse_sink_combine_kernel, (t, head_blocks), ws_m, ws_den, ws_acc, sinks, out, h, d, n_tiles,
               BLOCK_H=block_h, BLOCK_D=block_d, num_warps=warps)
    return out


def _view(x: torch.Tensor, shape: tuple[int, ...], name: str) -> torch.Tensor:
    try:
        return x.view(shape)
    except RuntimeError as err:
        raise ValueError(f"{name}: strides {x.stride()} do not flatten to {shape} without a copy") from err


# ----------------------------------------------------------------------------------------------------
# The public ops: kernels "ref" → reference, "triton" → kernel, "auto" → kernel on CUDA inputs.


def sparse_sink_attention(q, pool, index, sinks, scale: float, *, kernels: str = "auto", split: bool | None = None):
    """Attention of q [T, H, D] over the pool rows `index` [T, S] names → [T, H, D]; `pool` is a tensor or a
    list of up to three (their concatenation); see `sparse_sink_attention_ref`. split (kernel only): force
    the split-key (True) or fused (False) path; None decides from the grid; both give the same bits."""
    parts = _pool_parts(pool)
    if use_triton(kernels, q, *parts, index, sinks):
        return _sparse_sink_attention_triton(q, parts, index, sinks, float(scale), split)
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
