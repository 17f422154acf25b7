"""Grouped-query attention of a flat ragged batch over a paged KV cache (dense HF targets: Qwen3, Llama-3,
Gemma).

Layouts (named dims, style.md §3): T query tokens, Hq query heads, Hkv kv heads, G = Hq / Hkv query heads per
kv head (the GQA group), D head dim, P pages, S positions per page, slots = requests the block table holds.

    q           [T, Hq, D]       queries (already normed and roped), fp32 / fp16 / bf16
    k_pages     [P, S, Hkv, D]   in q's dtype: row r of page p holds the key of position (page index · S + r) of the
    v_pages     [P, S, Hkv, D]   request that owns page p (page index = which of the request's pages it is)
    block_table [slots, pages_per_slot] int64: block_table[s, j // S] is the page holding position j of slot s
    slot        [T] int64        the slot (request) of each query token (int32 also accepted, as for the table)
    pos         [T] int64        the query token's absolute position in its request
    scale       float            softmax scale (not assumed 1/√D: Gemma uses 1.0)
    window      int ≥ 1 | None   sliding window: keys j with pos − window < j ≤ pos; None: 0 ≤ j ≤ pos
    softcap     float > 0 | None logits s ← softcap · tanh(s / softcap) before the softmax (Gemma 2)
    out         [T, Hq, D]       in q's dtype

Semantics: query t, head h reads kv head h // G of its own slot at the positions j its window allows, causal and
including its own position (the caller writes the batch's K/V into the pages first). s_j = (q[t,h] · k_j) · scale
(then the softcap), p = softmax_j(s) in fp32, out[t,h] = Σ_j p_j · v_j. Every query has at least one key (its
own position), so no row is empty. Page rows of positions past `pos` (or before the window) and pages the block
table does not reach for the token's slot never influence the output: they may hold NaN / inf. Padding tokens
use a dummy slot whose block-table row is all page 0 with pos 0: they read one key and their output is
meaningless but finite where page 0's row 0 is.

Preconditions, unchecked (a check would read tensors back to the host): 0 ≤ pos < pages_per_slot · S,
0 ≤ slot < slots, and the pages the block table names for positions a token reads lie in [0, P). The engine's
admission guarantees them; block-table entries a token does not reach may hold anything.

Kernel (`_paged_attention_kernel`): one program per (token t, kv head g) holds the group's G query heads as
one [BLOCK_H, D] tile (BLOCK_H = next pow2 of G, at least 16 for tl.dot; padded rows masked), so each key and
value row is read once for the whole group. Key positions are walked in tiles of BLOCK_N aligned to absolute
multiples of BLOCK_N, each position's page looked up through the block table (any page size), positions outside
[window start, pos] masked (their rows are never loaded). A tile gives a partial softmax state (m = log2-domain
max, den = Σ 2^(s − m), acc = p·V), as in sparse sink attention; tiles are merged in order into the state of
their chunk (CHUNK positions, aligned likewise), and chunks in order into the token's state, with that module's
`merge_partials` (explicit FMAs). out = acc / den.

Split keys (flash-decoding): while the fused grid T × Hkv leaves SMs idle (decode), program (t, g, i) computes
the state of the token's i-th chunk alone and writes it to an fp32 workspace; `_sparse_sink_combine_kernel`
merges a token's chunk states in order starting from a sink of −inf (an empty state: the first merge returns
its chunk exactly). The chunk states and the merges are the fused kernel's, in the same order, so both paths
give the same bits.

Numerics. Scores, softmax and accumulation in fp32; the operands of both dots are in the input dtype (fp32
dots at IEEE precision, never TF32), and p is cast to the value dtype for the p·V dot, as HF's eager
attention casts probabilities to the value dtype. Against the fp32 reference, fp32 agrees to fp32 tolerance;
fp16 / bf16 differ in addition by p's rounding, at most u·max|v| absolutely. The softcap's tanh is libdevice's
on the GPU.

Batch invariance (architecture.md §9): tile and chunk boundaries are absolute positions and block sizes depend
on (G, D) only, each program reads only its own token's slot, position and table row, and the reduction runs
in a fixed order with no atomics, so a token's output is bit-identical whatever else is in the batch, whatever
rows it may not read hold, and whichever path T picks.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from dspark.ops._launch import (FLOAT_DTYPES, HAS_TRITON, INDEX_DTYPES, cdiv, check, check_tensor, dot, launch,
                                next_pow2, register, tl, triton, use_triton)
# The merge of two online-softmax states and the in-order combine of per-split partials are sparse sink
# attention's: with a sink of −inf the combine starts from nothing (module docstring, "Split keys").
from dspark.ops.attention import _sparse_sink_combine_kernel, head_block_config, merge_partials, sm_count

if HAS_TRITON:
    from triton.language.extra import libdevice

_LOG2E = math.log2(math.e)


def paged_attention_ref(q: torch.Tensor, k_pages: torch.Tensor, v_pages: torch.Tensor, block_table: torch.Tensor,
                        slot: torch.Tensor, pos: torch.Tensor, scale: float, *, window: Optional[int] = None,
                        softcap: Optional[float] = None) -> torch.Tensor:
    # No host reads (the CPU model runs this under torch.compile): each token gathers every position its slot's
    # table row can hold, J = pages_per_slot·S, and masks the ones it may not read, so memory is T·J·Hkv·D.
    t, hq, d = q.shape
    _, page, hkv, _ = k_pages.shape
    _check_heads(hq, hkv)
    _check_window_softcap(window, softcap)
    j = torch.arange(block_table.shape[1] * page, device=q.device)  # [J] positions of a slot
    allowed = j <= pos[:, None]  # [T, J]: causal, including the token's own position
    if window is not None:
        allowed &= j > pos[:, None] - window
    pages = torch.where(allowed, block_table[slot][:, j // page], 0)  # [T, J]; entries not reached name any page
    mask = allowed[..., None, None]
    k = torch.where(mask, k_pages[pages, j % page].float(), 0.0)  # [T, J, Hkv, D]; unread rows may hold NaN
    v = torch.where(mask, v_pages[pages, j % page].float(), 0.0)  # [T, J, Hkv, D]
    qg = q.float().reshape(t, hkv, hq // hkv, d)  # [T, Hkv, G, D]: query head h reads kv head h // G
    scores = torch.einsum("tkgd,tjkd->tkgj", qg, k) * scale  # [T, Hkv, G, J]
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    scores = scores.masked_fill(~allowed[:, None, None, :], float("-inf"))
    out = torch.einsum("tkgj,tjkd->tkgd", torch.softmax(scores, dim=-1), v)  # [T, Hkv, G, D]
    return out.reshape(t, hq, d).to(q.dtype)


def _check_heads(hq: int, hkv: int) -> None:
    check(hkv >= 1 and hq % hkv == 0, f"q: {hq} query heads is not a multiple of the pages' {hkv} kv heads")


def _check_window_softcap(window: Optional[int], softcap: Optional[float]) -> None:
    check(window is None or int(window) >= 1, f"window: {window} must be None or ≥ 1")
    check(softcap is None or float(softcap) > 0, f"softcap: {softcap} must be None or > 0")


# ----------------------------------------------------------------------------------------------------
# Triton kernel.


@triton.jit
def _tanh(x, LIBDEVICE: tl.constexpr):
    """tanh in fp32: libdevice's on the GPU; the interpreter has no libdevice, there (1 − e) / (1 + e) with
    e = exp(−2|x|), which never overflows (absolute error ~1e-7)."""
    if LIBDEVICE:
        y = libdevice.tanh(x)
    else:
        e = tl.exp(-2.0 * tl.abs(x))
        y = (1.0 - e) / (1.0 + e)
        y = tl.where(x < 0, -y, y)
    return y


@triton.jit
def _tile_partial(q, tile0, lo, hi, bt_row_ptr, PAGE, k_ptr, stride_kp, stride_ks, v_ptr, stride_vp, stride_vs,
                  kv_off_k, kv_off_v, d, d_ok, qk_scale, cap_scale, cap_log2, BLOCK_N: tl.constexpr,
                  HAS_SOFTCAP: tl.constexpr, LIBDEVICE: tl.constexpr, IEEE: tl.constexpr):
    """Key positions tile0 … tile0+BLOCK_N−1 of one slot, those in [lo, hi] valid (at least one): the tile's
    partial state for the group's heads, from nothing (m [BLOCK_H] log2-domain max, den = Σ 2^(s − m),
    acc [BLOCK_H, BLOCK_D] = Σ p·v). Invalid positions read nothing: their page rows may hold NaN."""
    j = tile0 + tl.arange(0, BLOCK_N)  # [BLOCK_N] absolute positions
    valid = (j >= lo) & (j <= hi)
    page = tl.load(bt_row_ptr + j // PAGE, mask=valid, other=0).to(tl.int64)  # [BLOCK_N], through the table
    row = (j % PAGE).to(tl.int64)
    kv_mask = valid[:, None] & d_ok[None, :]
    k = tl.load(k_ptr + (page * stride_kp + row * stride_ks + kv_off_k)[:, None] + d[None, :], mask=kv_mask,
                other=0.0)  # [BLOCK_N, BLOCK_D]
    qk = dot(q, tl.trans(k), IEEE)  # [BLOCK_H, BLOCK_N] fp32
    if HAS_SOFTCAP:  # softcap·tanh(qk·scale / softcap), in the log2 domain
        s = _tanh(qk * cap_scale, LIBDEVICE) * cap_log2
    else:
        s = qk * qk_scale
    s = tl.where(valid[None, :], s, -float("inf"))
    m = tl.max(s, axis=1)
    p = tl.exp2(s - m[:, None])  # invalid positions exactly 0
    v = tl.load(v_ptr + (page * stride_vp + row * stride_vs + kv_off_v)[:, None] + d[None, :], mask=kv_mask,
                other=0.0)  # [BLOCK_N, BLOCK_D]
    return m, tl.sum(p, axis=1), dot(p.to(v_ptr.dtype.element_ty), v, IEEE)


@triton.jit
def _chunk_state(q, c, lo, hi, bt_row_ptr, PAGE, k_ptr, stride_kp, stride_ks, v_ptr, stride_vp, stride_vs,
                 kv_off_k, kv_off_v, d, d_ok, qk_scale, cap_scale, cap_log2, BLOCK_H: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, CHUNK: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                 LIBDEVICE: tl.constexpr, IEEE: tl.constexpr):
    """Chunk c (positions c·CHUNK … (c+1)·CHUNK − 1, holding a valid one): its tiles merged in order from
    nothing. Tiles are aligned to absolute multiples of BLOCK_N, so each tile holds a valid position."""
    m = tl.full([BLOCK_H], -float("inf"), tl.float32)
    den = tl.zeros([BLOCK_H], dtype=tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_D], dtype=tl.float32)
    start = tl.maximum(c * CHUNK, (lo // BLOCK_N) * BLOCK_N)
    end = tl.minimum((c + 1) * CHUNK, hi + 1)
    for tile0 in range(start, end, BLOCK_N):
        m_j, den_j, acc_j = _tile_partial(q, tile0, lo, hi, bt_row_ptr, PAGE, k_ptr, stride_kp, stride_ks, v_ptr,
                                          stride_vp, stride_vs, kv_off_k, kv_off_v, d, d_ok, qk_scale, cap_scale,
                                          cap_log2, BLOCK_N, HAS_SOFTCAP, LIBDEVICE, IEEE)
        m, den, acc = merge_partials(m, den, acc, m_j, den_j, acc_j)
    return m, den, acc


@triton.jit
def _paged_attention_kernel(q_ptr, stride_qt, stride_qh, k_ptr, stride_kp, stride_ks, stride_kh, v_ptr, stride_vp,
                            stride_vs, stride_vh, bt_ptr, stride_bt, slot_ptr, pos_ptr, out_ptr, ws_m_ptr,
                            ws_den_ptr, ws_acc_ptr, HQ, D, PAGE, WINDOW, N_SPLITS, qk_scale, cap_scale, cap_log2,
                            GROUP: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                            CHUNK: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                            LIBDEVICE: tl.constexpr, IEEE: tl.constexpr, SPLIT: tl.constexpr):
    """Fused (SPLIT False): out[t, h] for token t and the GROUP query heads of kv head g, its chunks merged in
    order from nothing. SPLIT: program (t, g, i) writes the state of the token's i-th chunk to ws_m, ws_den
    [T, N_SPLITS, HQ] and ws_acc [T, N_SPLITS, HQ, D] (fp32; m = −inf marks a split past the token's last
    chunk, den / acc left unwritten), which `_sparse_sink_combine_kernel` merges in order (sink −inf).
    qk_scale = scale·log2(e); with HAS_SOFTCAP, cap_scale = scale / softcap and cap_log2 = softcap·log2(e)."""
    t = tl.program_id(0).to(tl.int64)
    g = tl.program_id(1)
    hi = tl.load(pos_ptr + t)  # the token's own position: its last key
    if HAS_WINDOW:
        lo = tl.maximum(hi - WINDOW + 1, 0)
    else:
        lo = hi * 0
    bt_row_ptr = bt_ptr + tl.load(slot_ptr + t) * stride_bt
    i = tl.arange(0, BLOCK_H)
    h = g * GROUP + i  # [BLOCK_H] query heads of kv head g
    h_ok = i < GROUP
    d = tl.arange(0, BLOCK_D)
    d_ok = d < D
    kv_off_k = g.to(tl.int64) * stride_kh
    kv_off_v = g.to(tl.int64) * stride_vh
    first = lo // CHUNK
    if SPLIT:
        c = first + tl.program_id(2)
        ws = (t * N_SPLITS + tl.program_id(2)) * HQ + h  # [BLOCK_H]
        if c * CHUNK <= hi:
            q = tl.load(q_ptr + t * stride_qt + h[:, None] * stride_qh + d[None, :],
                        mask=h_ok[:, None] & d_ok[None, :], other=0.0)  # [BLOCK_H, BLOCK_D]
            m, den, acc = _chunk_state(q, c, lo, hi, bt_row_ptr, PAGE, k_ptr, stride_kp, stride_ks, v_ptr,
                                       stride_vp, stride_vs, kv_off_k, kv_off_v, d, d_ok, qk_scale, cap_scale,
                                       cap_log2, BLOCK_H, BLOCK_N, BLOCK_D, CHUNK, HAS_SOFTCAP, LIBDEVICE, IEEE)
            tl.store(ws_m_ptr + ws, m, mask=h_ok)
            tl.store(ws_den_ptr + ws, den, mask=h_ok)
            tl.store(ws_acc_ptr + ws[:, None] * D + d[None, :], acc, mask=h_ok[:, None] & d_ok[None, :])
        else:
            tl.store(ws_m_ptr + ws, tl.full([BLOCK_H], -float("inf"), tl.float32), mask=h_ok)
    else:
        q = tl.load(q_ptr + t * stride_qt + h[:, None] * stride_qh + d[None, :],
                    mask=h_ok[:, None] & d_ok[None, :], other=0.0)  # [BLOCK_H, BLOCK_D]
        m = tl.full([BLOCK_H], -float("inf"), tl.float32)
        den = tl.zeros([BLOCK_H], dtype=tl.float32)
        acc = tl.zeros([BLOCK_H, BLOCK_D], dtype=tl.float32)
        for c in range(first, hi // CHUNK + 1):  # fixed order: chunks by position, as the split path's combine
            m_c, den_c, acc_c = _chunk_state(q, c, lo, hi, bt_row_ptr, PAGE, k_ptr, stride_kp, stride_ks, v_ptr,
                                             stride_vp, stride_vs, kv_off_k, kv_off_v, d, d_ok, qk_scale,
                                             cap_scale, cap_log2, BLOCK_H, BLOCK_N, BLOCK_D, CHUNK, HAS_SOFTCAP,
                                             LIBDEVICE, IEEE)
            m, den, acc = merge_partials(m, den, acc, m_c, den_c, acc_c)
        out = acc / den[:, None]
        tl.store(out_ptr + (t * HQ + h[:, None]) * D + d[None, :], out.to(out_ptr.dtype.element_ty),
                 mask=h_ok[:, None] & d_ok[None, :])


# ----------------------------------------------------------------------------------------------------
# Launcher and registration.

_CHUNK = 1024  # key positions per split (a multiple of every BLOCK_N); untuned (no GPU measurement yet)
_MAX_D = 512


def _config(group: int, d: int, elem_bytes: int) -> tuple[int, int, int, int]:
    """(BLOCK_H, BLOCK_N, BLOCK_D, num_warps) from (G, D, dtype) only, never from T or the positions (batch
    invariance). tl.dot needs every dim ≥ 16, so a group of 1–8 heads pads to 16 rows. A K or V tile holds
    at most 8 KB (32 positions × 128 channels in bf16). tools/kernel_check.py (Triton 3.9, sm_90): Qwen3-8B
    bf16 at 64 positions took 150–182 registers (3 blocks per SM), at 32 108–126 (4 blocks); fp32 at D = 256
    with 32 positions spilled 4.5 KB per thread, with 16 none. Untuned (no GPU measurement yet)."""
    block_d = max(16, next_pow2(d))
    block_n = max(16, min(64, 8192 // (block_d * elem_bytes)))
    return max(16, next_pow2(group)), block_n, block_d, 4 if block_d <= 128 else 8


def split_chunks(t: int, hkv: int, n_splits: int, device: torch.device) -> bool:
    """Whether the split path runs: while the fused grid T × Hkv leaves an SM without a program (decode: Qwen3-8B
    has 8 kv heads, so T ≤ 16 on an H100). A chunk's partial, G·D fp32 written and read back, is 1/128 of the
    chunk's CHUNK·2·D cache bytes at G = 4 in bf16, so the split is cheap wherever it runs. Untuned."""
    return n_splits > 1 and t * hkv < sm_count(device)


@register("paged_attention")
def _paged_attention_triton(q: torch.Tensor, k_pages: torch.Tensor, v_pages: torch.Tensor, block_table: torch.Tensor,
                            slot: torch.Tensor, pos: torch.Tensor, scale: float, window: Optional[int] = None,
                            softcap: Optional[float] = None, split: Optional[bool] = None) -> torch.Tensor:
    """q [T, Hq, D] (fp32/fp16/bf16, unit last stride), k_pages / v_pages [P, S, Hkv, D] (q's dtype, unit last
    stride), block_table [slots, pages_per_slot] (int32/int64, unit last stride), slot / pos [T] (int32/int64,
    contiguous) → [T, Hq, D] in q's dtype, contiguous. split: force the split (True) or fused (False) path; None
    picks by `split_chunks`. The two give identical bits. Meaning: `paged_attention_ref`."""
    check_tensor("q", q, ndim=3, dtypes=FLOAT_DTYPES, unit_last=True)
    t, hq, d = (int(x) for x in q.shape)
    check(1 <= d <= _MAX_D, f"q: head dim {d} outside [1, {_MAX_D}]")
    dev = q.device
    check_tensor("k_pages", k_pages, ndim=4, dtypes=(q.dtype,), device=dev, unit_last=True)
    _, page, hkv, dk = (int(x) for x in k_pages.shape)
    check(dk == d, f"k_pages: head dim {dk}, q has {d}")
    check(page >= 1, f"k_pages: page size {page} must be ≥ 1")
    check_tensor("v_pages", v_pages, shape=k_pages.shape, dtypes=(q.dtype,), device=dev, unit_last=True)
    _check_heads(hq, hkv)
    check_tensor("block_table", block_table, ndim=2, dtypes=INDEX_DTYPES, device=dev, unit_last=True)
    check_tensor("slot", slot, shape=(t,), dtypes=INDEX_DTYPES, device=dev, contiguous=True)
    check_tensor("pos", pos, shape=(t,), dtypes=INDEX_DTYPES, device=dev, contiguous=True)
    _check_window_softcap(window, softcap)
    check(math.isfinite(scale), f"scale: {scale} must be finite")
    out = torch.empty((t, hq, d), dtype=q.dtype, device=dev)
    group = hq // hkv
    block_h, block_n, block_d, warps = _config(group, d, q.element_size())
    reach = int(block_table.shape[1]) * page  # positions a slot's table row can hold
    span = reach if window is None else min(int(window), reach)
    n_splits = min(cdiv(span - 1, _CHUNK) + 1, cdiv(reach, _CHUNK)) if reach else 0  # chunks one token can touch
    if split is None:
        split = split_chunks(t, hkv, n_splits, dev)
    split = bool(split) and n_splits > 0
    if split:  # per-chunk partials [T, N_SPLITS, Hq(, D)] fp32
        ws_m = torch.empty((t, n_splits, hq), dtype=torch.float32, device=dev)
        ws_den = torch.empty((t, n_splits, hq), dtype=torch.float32, device=dev)
        ws_acc = torch.empty((t, n_splits, hq, d), dtype=torch.float32, device=dev)
    else:
        ws_m = ws_den = ws_acc = out  # stand-ins, never dereferenced
    cap = float(softcap) if softcap is not None else 1.0
    launch(_paged_attention_kernel, (t, hkv, n_splits) if split else (t, hkv), q, q.stride(0), q.stride(1), k_pages,
           k_pages.stride(0), k_pages.stride(1), k_pages.stride(2), v_pages, v_pages.stride(0), v_pages.stride(1),
           v_pages.stride(2), block_table, block_table.stride(0), slot, pos, out, ws_m, ws_den, ws_acc, hq, d, page,
           int(window or 0), n_splits, float(scale) * _LOG2E, float(scale) / cap, cap * _LOG2E, GROUP=group,
           BLOCK_H=block_h, BLOCK_N=block_n, BLOCK_D=block_d, CHUNK=_CHUNK, HAS_WINDOW=window is not None,
           HAS_SOFTCAP=softcap is not None, LIBDEVICE=q.is_cuda, IEEE=q.dtype == torch.float32, SPLIT=split,
           num_warps=warps)
    if split:
        cb_h, cb_d, cb_warps = head_block_config(hq, d, q.element_size())
        no_sink = torch.full((hq,), -math.inf, dtype=torch.float32, device=dev)  # merge from nothing
        launch(_sparse_sink_combine_kernel, (t, cdiv(hq, cb_h)), ws_m, ws_den, ws_acc, no_sink, out, hq, d, n_splits,
               BLOCK_H=cb_h, BLOCK_D=cb_d, num_warps=cb_warps)
    return out


# ----------------------------------------------------------------------------------------------------
# The public op: kernels "ref" → reference, "triton" → kernel, "auto" → kernel on CUDA inputs.


def paged_attention(q, k_pages, v_pages, block_table, slot, pos, scale: float, *, window: Optional[int] = None,
                    softcap: Optional[float] = None, kernels: str = "auto",
                    split: Optional[bool] = None) -> torch.Tensor:
    """Attention of q [T, Hq, D] over each token's own slot in the paged cache → [T, Hq, D]; shapes in the
    module docstring, meaning: `paged_attention_ref`. split (kernel only): force the split-key (True) or fused
    (False) path; None decides from the grid; both give the same bits."""
    if use_triton(kernels, q, k_pages, v_pages, block_table, slot, pos):
        return _paged_attention_triton(q, k_pages, v_pages, block_table, slot, pos, float(scale), window, softcap,
                                       split)
    return paged_attention_ref(q, k_pages, v_pages, block_table, slot, pos, scale, window=window, softcap=softcap)
