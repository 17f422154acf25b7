"""The lightning indexer of CSA layers: score compressed entries per query, keep the top k.

Layouts: B batch, T queries, Hi indexer heads, di indexer head dim, W compressed entries, P pool rows.

    q        [B, T, Hi, di]   indexer queries (roped with the compress table)
    keys     [B, W, di]       the indexer's own compressed keys (dense mode, rows None), or
             [P, di]          a pool of them (paged mode, rows given)
    rows     [B, W]           int, paged mode only: the pool row holding entry w of batch row b; a row outside
                              [0, P) (−1 by convention) reads as a zero key. Why: the model's keys live in the
                              paged entry pool, and a dense [B, W, di] copy per query (B = tokens, W = E =
                              4096 entries at 16k context, m = 4) would be written and read again per CSA layer
    w        [B, T, Hi]       per-head weights (x·weights_projᵀ · Hi^-1/2)
    visible  [B, T]           int, number of entries query t may use (causal: floor((t+1)/m)); entries
                              w < visible are visible, values outside [0, W] clamp
    scores   [B, T, W] fp32   Σ_h w[t,h] · ReLU(q[t,h]·keys[w]) · di^-1/2, for every entry, visible or not
    topk     [B, T, k] int64  chosen entries in increasing index order, then -1 where fewer than k are
                              visible

Selection: the k = min(index_topk, W) highest scores among visible entries; ties go to the lower entry
index (deepseek_v4.md §9.4: this rule is ours and must be shared by kernel and reference). Scores
compare as floats with −0.0 = +0.0 and every NaN above +inf (torch's descending sort puts NaN first),
so the selection is defined for any scores; hidden entries never influence it (their keys may hold
garbage, and so may pool rows that only hidden entries name). The chosen entries are listed by index,
not by score: a consumer that reduces over them (the sparse attention) then sees the same order
whenever it gets the same set, even when two score computations round differently without changing
the set.

Kernel (`_indexer_kernel`, one program per query (b, t); SCORE and SELECT are constexpr flags, so
`indexer_scores`, `indexer_topk` and the fused `indexer_select` share one body):
- SCORE: the query's q [Hi, di] is dotted with the keys in tiles of BLOCK_W entries (tl.dot, fp32
  accumulation, operands converted to the DOT dtype, a constexpr), ReLU, × scale × w, summed over the
  heads (head blocks in order) and stored. The products of fp16 / bf16 operands are exact in fp32, so
  a 16-bit dot loses nothing against the reference's fp32 upcast but summation order.
- PAGED: each key tile first loads its BLOCK_W row numbers from `rows` (−1 past W) and gathers those pool
  rows, invalid ones masked to 0.0; the tile then feeds the same dots in the same order, so paged scores
  are bit-identical to dense scores of the gathered keys. Per query it drops the dense copy's write and
  re-read of W·di values (W = 4096, di = 128, bf16: 1 MiB each way) for W row numbers.
- SELECT: on the row of scores (just written by this program, re-read after a barrier, or given):
  the order keys' min / max over the visible prefix, then `kth_key` (ops/_select.py), an NCAND-way
  search over the order keys for the k-th largest key κ (each pass counts visible keys ≥ NCAND
  candidates; ≤ 8 passes since 16^8 = 2^32), then one compaction pass writing every key > κ and the
  first k − #{key > κ} keys == κ (lowest indices) at their prefix-sum positions. Only the visible prefix
  of the row is read. Passes over the visible scores: 1 (min / max, folded into scoring when fused) + ≤ 8
  + 1.
  TODO(#7): a radix histogram would cut the search to ≤ 4 passes; measure first.
Batch invariance: tile sizes depend on (Hi, di) only, each program reads only its own query's q, w,
visible and scores row and its batch row's keys (paged: its row of `rows` and the pool rows named
there), every reduction runs in a fixed order (one dot per tile over the whole di, head blocks in
sequence, no split-K, no atomics), and the selection is exact integer work: a query's scores and top-k
are bit-identical whatever else is in flight.
TODO(#7): prefill reads each batch row's keys once per query; BLOCK_T queries per program sharing the
key tiles would divide that traffic (a fixed BLOCK_T keeps the invariance).
"""

from __future__ import annotations

from typing import Optional

import torch

from dspark.ops._launch import (FLOAT_DTYPES, INDEX_DTYPES, check, check_tensor, launch, next_pow2, register, tl,
                                triton, use_triton)
from dspark.ops._select import NCAND, kth_key, order_key, topk_lowest_index


def _gather_ref(pool: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Paged → dense keys: pool [P, di], rows [B, W] → [B, W, di] in the pool's dtype, zero where a row is
    outside [0, P)."""
    valid = (rows >= 0) & (rows < pool.shape[0])  # [B, W]
    if pool.shape[0] == 0:  # nothing to index; every row is invalid
        pool = pool.new_zeros(1, pool.shape[1])
    keys = pool[torch.where(valid, rows, 0).long()]  # [B, W, di]
    return torch.where(valid.unsqueeze(-1), keys, 0.0)  # selected, not multiplied: NaN / inf rows drop out


def indexer_scores_ref(q: torch.Tensor, keys: torch.Tensor, w: torch.Tensor, *,
                       rows: torch.Tensor | None = None) -> torch.Tensor:
    if rows is not None:
        keys = _gather_ref(keys, rows)  # [B, W, di]
    scale = q.shape[-1] ** -0.5
    dots = torch.einsum("bthd,bwd->bthw", q.float(), keys.float())  # [B, T, Hi, W]
    return (torch.relu(dots) * scale * w.float().unsqueeze(-1)).sum(dim=2)  # [B, T, W]


def indexer_topk_ref(scores: torch.Tensor, visible: torch.Tensor, k: int) -> torch.Tensor:
    n = scores.shape[-1]
    k = min(k, n)
    entry = torch.arange(n, device=scores.device)
    hidden = entry >= visible.unsqueeze(-1)  # [B, T, W]
    idx = topk_lowest_index(scores.masked_fill(hidden, float("-inf")), k)  # [B, T, k] best first
    idx = torch.where(idx >= visible.unsqueeze(-1), n, idx)  # hidden picks (fewer than k visible) → n
    idx = idx.sort(dim=-1).values  # index order, the n's last
    return torch.where(idx == n, torch.full_like(idx, -1), idx)


def indexer_select_ref(q: torch.Tensor, keys: torch.Tensor, w: torch.Tensor, visible: torch.Tensor, k: int, *,
                       rows: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(scores, topk) of one call: `indexer_topk_ref(indexer_scores_ref(q, keys, w, rows=rows), visible, k)`."""
    scores = indexer_scores_ref(q, keys, w, rows=rows)
    return scores, indexer_topk_ref(scores, visible, k)


# ----------------------------------------------------------------------------------------------------
# Triton kernel.

_DOT_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


@triton.jit
def _to_dot(x, DOT: tl.constexpr):
    """Loaded operand → the dot dtype (0 fp32, 1 fp16, 2 bf16)."""
    if DOT == 1:
        y = x.to(tl.float16)
    elif DOT == 2:
        y = x.to(tl.bfloat16)
    else:
        y = x.to(tl.float32)
    return y


@triton.jit
def _indexer_kernel(q_ptr, stride_qb, stride_qt, stride_qh, keys_ptr, stride_kb, stride_kw, rows_ptr, stride_rb,
                    stride_rw, w_ptr, stride_wb, stride_wt, stride_wh, scores_ptr, stride_sb, stride_st, vis_ptr,
                    stride_vb, stride_vt, topk_ptr, T, H, D, W, P, K, scale, BLOCK_H: tl.constexpr,
                    BLOCK_D: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_S: tl.constexpr, NCAND: tl.constexpr,
                    DOT: tl.constexpr, SCORE: tl.constexpr, SELECT: tl.constexpr, PAGED: tl.constexpr,
                    CHUNK_D: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    b = row // T
    t = row % T
    s_row = scores_ptr + b * stride_sb + t * stride_st
    v = tl.zeros([], dtype=tl.int64)
    if SELECT:
        v = tl.minimum(tl.maximum(tl.load(vis_ptr + b * stride_vb + t * stride_vt).to(tl.int64), 0), W)
    kmin = tl.full([], 2147483647, tl.int64)  # min / max order key over the visible prefix
    kmax = tl.full([], -2147483648, tl.int64)

    if SCORE:
        d = tl.arange(0, BLOCK_D)
        d_ok = d < D
        q_row = q_ptr + b * stride_qb + t * stride_qt
        w_row = w_ptr + b * stride_wb + t * stride_wt
        for w0 in range(0, W, BLOCK_W):
            ent = w0 + tl.arange(0, BLOCK_W)
            ent_ok = ent < W
            if PAGED:  # the tile's pool rows; invalid ones and the padding past W read as zero keys
                prow = tl.load(rows_ptr + b * stride_rb + ent * stride_rw, mask=ent_ok, other=-1).to(tl.int64)
                k_ok = (prow >= 0) & (prow < P)
                k_rows = keys_ptr + prow * stride_kw  # [BLOCK_W] row pointers
            else:
                k_ok = ent_ok
                k_rows = keys_ptr + b * stride_kb + ent * stride_kw
            if CHUNK_D == BLOCK_D:  # [BLOCK_W, BLOCK_D], read once for every head block
                k = _to_dot(tl.load(k_rows[:, None] + d[None, :], mask=k_ok[:, None] & d_ok[None, :], other=0.0), DOT)
            s = tl.zeros([BLOCK_W], dtype=tl.float32)
            for h0 in range(0, H, BLOCK_H):  # head blocks in order
                h = h0 + tl.arange(0, BLOCK_H)
                h_ok = h < H
                if CHUNK_D == BLOCK_D:
                    qh = _to_dot(tl.load(q_row + h[:, None] * stride_qh + d[None, :],
                                         mask=h_ok[:, None] & d_ok[None, :], other=0.0), DOT)  # [BLOCK_H, BLOCK_D]
                    if DOT == 0:
                        dots = tl.dot(qh, tl.trans(k), input_precision="ieee")  # no TF32 rounding
                    else:
                        dots = tl.dot(qh, tl.trans(k))  # [BLOCK_H, BLOCK_W] fp32
                else:
                    # fp32 (IEEE, FMA) dots hold both operand tiles in registers: whole 64×128 tiles spilled
                    # ~15 KB per thread on Triton 3.9 (tools/kernel_check.py), so di runs in CHUNK_D slices,
                    # in order, accumulating into the same fp32 product.
                    dots = tl.zeros([BLOCK_H, BLOCK_W], dtype=tl.float32)
                    for d0 in range(0, BLOCK_D, CHUNK_D):
                        dc = d0 + tl.arange(0, CHUNK_D)
                        dc_ok = dc < D
                        kc = _to_dot(tl.load(k_rows[:, None] + dc[None, :], mask=k_ok[:, None] & dc_ok[None, :],
                                             other=0.0), DOT)  # [BLOCK_W, CHUNK_D]
                        qc = _to_dot(tl.load(q_row + h[:, None] * stride_qh + dc[None, :],
                                             mask=h_ok[:, None] & dc_ok[None, :], other=0.0), DOT)
                        if DOT == 0:
                            dots = tl.dot(qc, tl.trans(kc), dots, input_precision="ieee")
                        else:
                            dots = tl.dot(qc, tl.trans(kc), dots)
                wh = tl.load(w_row + h * stride_wh, mask=h_ok, other=0.0).to(tl.float32)
                # ReLU that keeps NaN (as torch.relu); padded heads are dropped, not multiplied by 0, so a
                # garbage key cannot turn them into NaN.
                term = tl.where(dots < 0.0, 0.0, dots) * scale * wh[:, None]
                s += tl.sum(tl.where(h_ok[:, None], term, 0.0), axis=0)
            tl.store(s_row + ent, s, mask=ent_ok)
            if SELECT:
                vis = ent < v
                key = order_key(s)
                kmin = tl.minimum(kmin, tl.min(tl.where(vis, key, 2147483647), axis=0))
                kmax = tl.maximum(kmax, tl.max(tl.where(vis, key, -2147483648), axis=0))
        if SELECT:
            tl.debug_barrier()  # the selection re-reads the row other threads just stored
    elif SELECT:
        for s0 in range(0, v, BLOCK_S):
            offs = s0 + tl.arange(0, BLOCK_S)
            vis = offs < v
            key = order_key(tl.load(s_row + offs, mask=vis, other=0.0).to(tl.float32))
            kmin = tl.minimum(kmin, tl.min(tl.where(vis, key, 2147483647), axis=0))
            kmax = tl.maximum(kmax, tl.max(tl.where(vis, key, -2147483648), axis=0))

    if SELECT:
        n_sel = tl.minimum(v, K)
        # lo = min key satisfies #{key ≥ lo} = v ≥ n_sel; hi = max + 1 does not (n_sel ≥ 1). n_sel = 0
        # skips the search and the compaction selects nothing.
        lo = tl.where(n_sel > 0, kmin, 0)
        hi = tl.where(n_sel > 0, kmax + 1, 1)
        kappa, above = kth_key(s_row, v, n_sel, lo, hi, BLOCK_S, NCAND)
        need = n_sel - above  # entries tied at κ to take, lowest indices first
        out_row = topk_ptr + row * K
        taken = tl.zeros([], dtype=tl.int64)
        ties = tl.zeros([], dtype=tl.int64)
        for s0 in range(0, v, BLOCK_S):  # compaction, in index order
            offs = s0 + tl.arange(0, BLOCK_S)
            vis = offs < v
            key = order_key(tl.load(s_row + offs, mask=vis, other=0.0).to(tl.float32))
            eq = (vis & (key == kappa)).to(tl.int64)
            tie_rank = ties + tl.cumsum(eq, axis=0) - eq
            sel = ((vis & (key > kappa)) | ((eq > 0) & (tie_rank < need))).to(tl.int64)
            pos = taken + tl.cumsum(sel, axis=0) - sel
            tl.store(out_row + pos, offs.to(tl.int64), mask=sel > 0)
            taken += tl.sum(sel, axis=0)
            ties += tl.sum(eq, axis=0)
        for j0 in range(0, K, BLOCK_S):
            j = j0 + tl.arange(0, BLOCK_S)
            tl.store(out_row + j, tl.full([BLOCK_S], -1, tl.int64), mask=(j >= n_sel) & (j < K))


# ----------------------------------------------------------------------------------------------------
# Launchers and registrations.

_BLOCK_W = 64  # entries per score tile; untuned (no GPU measurement yet)
_BLOCK_S = 256  # scores per selection tile: the [BLOCK_S, NCAND] int64 count tile is 32 registers per thread
_MAX_D = 1024
# fp32 dots run di in slices of this many channels, at 8 warps: tools/kernel_check.py at flash shapes (Hi 64,
# di 128, BLOCK_W 64): whole-tile fp32 dots at 4 warps spilled 15 KB (sm_90) / 13 KB (sm_80) per thread on
# Triton 3.9; 32-channel slices still spilled 0.7–5.5 KB at 4 warps; 16 at 4 warps sat at 238–252 registers.
_FP32_CHUNK_D = 16
_FP32_WARPS = 8


def _config(h: int, d: int) -> tuple[int, int, int]:
    """(BLOCK_H, BLOCK_D, num_warps) from (Hi, di) only, never from B, T or W (batch invariance). tl.dot
    needs dims ≥ 16; the [BLOCK_H, BLOCK_W] fp32 product stays at ≤ 4k elements. Untuned."""
    block_d = max(16, next_pow2(d))
    block_h = max(16, min(next_pow2(h), 64))
    return block_h, block_d, 8 if block_d >= 256 else 4


def _dot_code(*tensors: torch.Tensor) -> int:
    """The dot dtype: the operands' common dtype, fp32 if they differ. The interpreter's bf16 dot is wrong,
    so interpreted bf16 operands run an fp32 dot (exact upcast, same products)."""
    dtype = tensors[0].dtype if all(t.dtype == tensors[0].dtype for t in tensors) else torch.float32
    if dtype == torch.bfloat16 and not tensors[0].is_cuda:
        dtype = torch.float32
    return _DOT_CODES[dtype]


def _check_keys_mode(keys, rows):
    """Dense keys [B, W, di] come without rows, a pool [P, di] with them; say so when a call mixes them."""
    if not isinstance(keys, torch.Tensor):
        return  # check_tensor names the problem
    if rows is None:
        check(keys.dim() != 2, f"keys: shape {tuple(keys.shape)} is a pool [P, di]; paged mode needs rows [B, W] "
                               "naming each entry's pool row")
    else:
        check(keys.dim() == 2, f"keys: with rows (paged mode) keys must be a pool [P, di], got shape "
                               f"{tuple(keys.shape)}; dense keys [B, W, di] take rows=None")


def _check_scoring(q, keys, w, rows):
    check_tensor("q", q, ndim=4, dtypes=FLOAT_DTYPES, unit_last=True)
    b, t, h, d = (int(s) for s in q.shape)
    check(h >= 1, f"q: no indexer heads in shape {tuple(q.shape)}")
    check(1 <= d <= _MAX_D, f"indexer head dim {d} outside [1, {_MAX_D}]")
    dev = q.device
    _check_keys_mode(keys, rows)
    if rows is None:
        check_tensor("keys", keys, ndim=3, dtypes=FLOAT_DTYPES, device=dev, unit_last=True)
        check(keys.shape[0] == b and keys.shape[2] == d,
              f"keys: expected [B={b}, W, di={d}], got {tuple(keys.shape)}")
        n = int(keys.shape[1])
    else:
        check_tensor("keys", keys, ndim=2, dtypes=FLOAT_DTYPES, device=dev, unit_last=True)
        check(keys.shape[1] == d, f"keys: expected a pool [P, di={d}], got {tuple(keys.shape)}")
        check_tensor("rows", rows, ndim=2, dtypes=INDEX_DTYPES, device=dev)
        check(rows.shape[0] == b, f"rows: expected [B={b}, W], got {tuple(rows.shape)}")
        n = int(rows.shape[1])
    check_tensor("w", w, shape=(b, t, h), dtypes=FLOAT_DTYPES, device=dev)
    return b, t, h, d, n


def _check_selection(scores_shape, visible, k, dev):
    b, t, n = scores_shape
    check_tensor("visible", visible, shape=(b, t), dtypes=INDEX_DTYPES, device=dev)
    check(isinstance(k, int) and k >= 0, f"k must be a non-negative int, got {k!r}")
    return min(k, n)


def _launch_indexer(q, keys, w, scores, visible, topk, *, score, select, rows=None):
    """One launch over B·T queries; tensors a flag leaves unused are stand-ins (never dereferenced)."""
    b, t, n = (int(s) for s in scores.shape)
    paged = score and rows is not None
    if score:
        h, d = int(q.shape[2]), int(q.shape[3])
        block_h, block_d, warps = _config(h, d)
        dot = _dot_code(q, keys)
        if dot == 0:
            warps = max(warps, _FP32_WARPS)
    else:
        q = keys = w = scores
        h = d = 1
        block_h, block_d, warps, dot = 16, 16, 4, 0
    key_strides, row_strides, pool_rows = (0, 0), (0, 0), 0
    if paged:  # keys [P, di]: pool row r at keys + r·stride(0)
        key_strides, row_strides, pool_rows = (0, keys.stride(0)), (rows.stride(0), rows.stride(1)), int(keys.shape[0])
    elif score:
        key_strides = (keys.stride(0), keys.stride(1))
    if not paged:
        rows = q
    if not select:  # then score: stand in with an input, not the output the kernel writes
        visible = topk = q
    kk = int(topk.shape[2]) if select else 0
    vis_strides = (visible.stride(0), visible.stride(1)) if select else (0, 0)
    launch(_indexer_kernel, (b * t,),
           q, q.stride(0), q.stride(1) if score else 0, q.stride(2) if score else 0,
           keys, *key_strides, rows, *row_strides,
           w, w.stride(0) if score else 0, w.stride(1) if score else 0, w.stride(2) if score else 0,
           scores, scores.stride(0), scores.stride(1), visible, *vis_strides, topk,
           t, h, d, n, pool_rows, kk, float(d) ** -0.5, BLOCK_H=block_h, BLOCK_D=block_d, BLOCK_W=_BLOCK_W,
           BLOCK_S=_BLOCK_S, NCAND=NCAND, DOT=dot, SCORE=score, SELECT=select, PAGED=paged,
           CHUNK_D=min(block_d, _FP32_CHUNK_D) if dot == 0 else block_d, num_warps=warps)


@register("indexer_scores")
def _indexer_scores_triton(q: torch.Tensor, keys: torch.Tensor, w: torch.Tensor,
                           rows: Optional[torch.Tensor] = None) -> torch.Tensor:
    """q [B, T, Hi, di], keys [B, W, di] or with rows a pool [P, di] (fp32/fp16/bf16, unit last stride), rows
    [B, W] or None (int32/int64, any strides), w [B, T, Hi] (float, any strides) → scores [B, T, W] fp32,
    contiguous. Meaning: `indexer_scores_ref`."""
    b, t, _, _, n = _check_scoring(q, keys, w, rows)
    scores = torch.empty((b, t, n), dtype=torch.float32, device=q.device)
    _launch_indexer(q, keys, w, scores, None, None, score=True, select=False, rows=rows)
    return scores


@register("indexer_topk")
def _indexer_topk_triton(scores: torch.Tensor, visible: torch.Tensor, k: int) -> torch.Tensor:
    """scores [B, T, W] (fp32/fp16/bf16, unit last stride), visible [B, T] (int32/int64, any strides, e.g. an
    expanded view), k ≥ 0 → topk [B, T, min(k, W)] int64, contiguous. Meaning: `indexer_topk_ref`."""
    check_tensor("scores", scores, ndim=3, dtypes=FLOAT_DTYPES, unit_last=True)
    kk = _check_selection(scores.shape, visible, k, scores.device)
    topk = torch.empty(tuple(scores.shape[:2]) + (kk,), dtype=torch.long, device=scores.device)
    if kk:
        _launch_indexer(None, None, None, scores, visible, topk, score=False, select=True)
    return topk


@register("indexer_select")
def _indexer_select_triton(q: torch.Tensor, keys: torch.Tensor, w: torch.Tensor, visible: torch.Tensor, k: int,
                           rows: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The two launchers' inputs → (scores [B, T, W] fp32, topk [B, T, min(k, W)] int64) from one launch.
    Meaning: `indexer_select_ref`."""
    b, t, _, _, n = _check_scoring(q, keys, w, rows)
    kk = _check_selection((b, t, n), visible, k, q.device)
    scores = torch.empty((b, t, n), dtype=torch.float32, device=q.device)
    topk = torch.empty((b, t, kk), dtype=torch.long, device=q.device)
    _launch_indexer(q, keys, w, scores, visible, topk, score=True, select=kk > 0, rows=rows)
    return scores, topk


# ----------------------------------------------------------------------------------------------------
# The public ops: kernels "ref" → reference, "triton" → kernel, "auto" → kernel on CUDA inputs.


def _inputs(*tensors):
    return [t for t in tensors if t is not None]


def indexer_scores(q, keys, w, *, rows=None, kernels: str = "auto"):
    """Index scores [B, T, W] fp32 of dense keys [B, W, di], or of pool rows keys[rows] (rows [B, W]); see
    `indexer_scores_ref`."""
    _check_keys_mode(keys, rows)
    if use_triton(kernels, *_inputs(q, keys, w, rows)):
        return _indexer_scores_triton(q, keys, w, rows)
    return indexer_scores_ref(q, keys, w, rows=rows)


def indexer_topk(scores, visible, k: int, *, kernels: str = "auto"):
    """The top min(k, W) visible entries per query, by index, −1 padded → [B, T, k] int64; see
    `indexer_topk_ref`."""
    if use_triton(kernels, scores, visible):
        return _indexer_topk_triton(scores, visible, int(k))
    return indexer_topk_ref(scores, visible, k)


def indexer_select(q, keys, w, visible, k: int, *, rows=None, kernels: str = "auto"):
    """(scores, topk) in one launch: `indexer_topk(indexer_scores(q, keys, w, rows=rows), visible, k)` without a
    second launch or a separate min / max pass; see `indexer_select_ref`."""
    _check_keys_mode(keys, rows)
    if use_triton(kernels, *_inputs(q, keys, w, visible, rows)):
        return _indexer_select_triton(q, keys, w, visible, int(k), rows)
    return indexer_select_ref(q, keys, w, visible, k, rows=rows)
