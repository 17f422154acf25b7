"""Mixture of experts: routing and the SwiGLU expert computation. (Over 500 lines on purpose: router
and experts share the layouts below and are the two halves of one block; each half reads alone.)

Layouts: N tokens, D hidden, E experts, K experts per token, I expert width.

    x        [N, D]        router / expert input (post_attention_layernorm output)
    gate_w   [E, D]        router weight
    bias     [E]           fp32 correction bias, used for SELECTION only (score routing)
    tid2eid  [V, K]        hash routing table (hash layers), int
    indices  [N, K] int64  chosen experts; -1 marks a slot that routes nowhere (padding)
    weights  [N, K] fp32   routing weights, renormalised then × routed_scaling_factor
    gate_up  [E, 2I, D]    rows [:I] gate (w1), rows [I:] up (w3);  down [E, D, I] (w2)

Scores: s = sqrt(softplus(x·gate_wᵀ)) ("sqrtsoftplus") or sigmoid; weights = s[idx] / (Σ s[idx] + 1e-20)
× scaling. Ties in the top-k selection are broken by the lowest expert index (architecture.md §9).
SwiGLU with V4's clamp: gate ≤ limit (max only), up ∈ [−limit, limit]; y = (silu(g)·u)·downᵀ.

Paths, all chosen in `experts` (from autograd state, device and static shapes only): training, when
autograd records through the expert weights, `experts_sorted` (tokens grouped per expert; one host read
of the group sizes). Inference: on CUDA the grouped Triton kernels — token slots sorted by expert on the
device, a tile plan sized from worst-case bounds (no host reads, so it can sit in a CUDA graph), one
gate/up GEMM with the SwiGLU fused and one down GEMM per tile of BLOCK_M slots of one expert, each
slot's result written at its own position and combined over its K slots in slot order (no atomics).
Every expert's weights are read once per tile of its slots, so at decode (a few slots per expert) the
weight stream is the cost. On CPU `experts_dense` or the reference, whichever is faster for the shape.

Router (`score_route`, `hash_route`): on CUDA two launches. `_router_scores_kernel`, one program per tile
of BLOCK_T = 16 tokens × BLOCK_E = 16 experts, computes the tile's logits (a tl.dot over the whole D in
order, fp32 accumulation) and its scores, and writes them to an fp32 [N, E] workspace; then
`_route_select_kernel`, HASH a constexpr, one program per 4 tokens, reads their [4, E] scores and picks
(hash routing gathers just its K). Splitting E spreads gate_w's stream over E / 16 programs: at V4-Flash's
E = 256, D = 4096 in bf16 each of the 16 reads 128 KB of gate_w (plus 8 KB of x per token), where one
program used to read all 2 MB on one SM; the select reads 1 KB of scores per token. A second launch is the
simplest way to see a token's whole row of scores, with no atomics or completion counter; the round trip
costs N·E·4 bytes. Batch invariant: each score is one program's in-order reduction over D (no split-K, no
atomics) and the selection is exact per token; tile sizes come from E and D only, so a token's result does
not depend on the rest of the batch. Roundings follow the reference op by op on CUDA: logits to the model
dtype (as F.linear's output), softplus, sqrt or sigmoid each in fp32 (libdevice exp / log1p, IEEE sqrt and
divide, as torch's CUDA ops) and rounded to the model dtype (the workspace holds those values exactly);
bias added in fp32. Selection is K rounds of "max biased score, lowest index among equals" over int order
keys (exact; NaN ranks above +inf and −0.0 equals +0.0, as torch's stable descending sort), so ties resolve
exactly as `topk_lowest_index`, across expert tiles too. Hash routing reads its K experts from
tid2eid[input_ids] instead (−1 → weight 0). Unchecked, as that would need a host read: ids must index
tid2eid (the kernel would read out of bounds) and entries must be < E or −1 (the reference raises; the
kernel gives an entry ≥ E weight 0). Weights are renormalised and scaled in fp32.
NOTE: bf16 is for the GPU; the interpreter's fp32 → bf16 conversion truncates.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dspark.ops._launch import (FLOAT_DTYPES, HAS_TRITON, INDEX_DTYPES, cdiv, check, check_tensor, dot, launch,
                                next_pow2, register, tl, triton, use_triton)
from dspark.ops._select import argmax_lowest, order_key, topk_lowest_index

if HAS_TRITON:
    from triton.language.extra import libdevice

SCORING_FUNCS = ("sqrtsoftplus", "sigmoid")


def router_scores_ref(x: torch.Tensor, gate_w: torch.Tensor, scoring_func: str) -> torch.Tensor:
    logits = F.linear(x, gate_w)  # [N, E], model dtype as in HF
    if scoring_func == "sqrtsoftplus":
        return F.softplus(logits).sqrt()
    if scoring_func == "sigmoid":
        return torch.sigmoid(logits)
    raise ValueError(f"unknown scoring_func {scoring_func!r}")


def route_ref(scores: torch.Tensor, indices: torch.Tensor, scaling: float) -> torch.Tensor:
    """Routing weights for chosen `indices` [N, K] (-1 = nowhere, weight 0) → fp32 [N, K]."""
    picked = scores.float().gather(-1, indices.clamp(min=0)) * (indices >= 0)
    return picked / (picked.sum(-1, keepdim=True) + 1e-20) * scaling


def score_route_ref(x, gate_w, bias, k: int, scoring_func: str, scaling: float):
    """Score routing → (weights fp32 [N, K], indices int64 [N, K])."""
    scores = router_scores_ref(x, gate_w, scoring_func)
    indices = topk_lowest_index(scores.float() + bias.float(), k)
    return route_ref(scores, indices, scaling), indices


def hash_route_ref(x, gate_w, tid2eid, input_ids, scoring_func: str, scaling: float):
    """Hash routing: experts from tid2eid[input_ids], weights from the learned scores."""
    scores = router_scores_ref(x, gate_w, scoring_func)
    indices = tid2eid[input_ids].long()
    return route_ref(scores, indices, scaling), indices


# ----------------------------------------------------------------------------------------------------
# Router kernel: scores, correction bias, top-k (or hash table), renormalised weights.


@triton.jit
def _exp(x, LIBDEVICE: tl.constexpr):
    """exp in fp32: libdevice's, the CUDA math library's expf that torch's CUDA ops call (tl.exp is an ex2
    approximation). The interpreter has no libdevice: there numpy's exp."""
    if LIBDEVICE:
        y = libdevice.exp(x)
    else:
        y = tl.exp(x)
    return y


@triton.jit
def _log1p(z, LIBDEVICE: tl.constexpr):
    """log(1 + z) in fp32, accurate for small z; the interpreter's form is u = 1 + z, log(u)·z / (u − 1)."""
    if LIBDEVICE:
        y = libdevice.log1p(z)
    else:
        u = 1.0 + z
        y = tl.where(u == 1.0, z, tl.log(u) * (z / tl.where(u == 1.0, 1.0, u - 1.0)))  # no 0 · inf
    return y


@triton.jit
def _router_scores_kernel(x_ptr, stride_x, w_ptr, stride_w, scores_ptr, N, E, D, BLOCK_T: tl.constexpr,
                          BLOCK_E: tl.constexpr, BLOCK_D: tl.constexpr, SQRTSOFTPLUS: tl.constexpr,
                          IEEE: tl.constexpr, LIBDEVICE: tl.constexpr):
    """scores[t, e] for one tile of BLOCK_T tokens × BLOCK_E experts, in fp32 holding model-dtype values."""
    t = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    t_ok = t < N
    e = tl.program_id(1).to(tl.int64) * BLOCK_E + tl.arange(0, BLOCK_E)
    e_ok = e < E
    acc = tl.zeros((BLOCK_T, BLOCK_E), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):  # whole D in one program, in order: batch invariant
        d = d0 + tl.arange(0, BLOCK_D)
        d_ok = d < D
        xs = tl.load(x_ptr + t[:, None] * stride_x + d[None, :], mask=t_ok[:, None] & d_ok[None, :], other=0.0)
        ws = tl.load(w_ptr + e[None, :] * stride_w + d[:, None], mask=d_ok[:, None] & e_ok[None, :], other=0.0)
        acc += dot(xs, ws, IEEE)  # [BLOCK_T, BLOCK_E]
    # Each op's result rounds to the model dtype, as the reference's F.linear / softplus / sqrt / sigmoid.
    dt = x_ptr.dtype.element_ty
    logit = acc.to(dt).to(tl.float32)
    if SQRTSOFTPLUS:
        big = logit > 20.0  # torch's threshold: softplus(l) = l there; exp(0) keeps exp from overflowing
        sp = tl.where(big, logit, _log1p(_exp(tl.where(big, 0.0, logit), LIBDEVICE), LIBDEVICE))
        s = tl.sqrt_rn(sp.to(dt).to(tl.float32)).to(dt).to(tl.float32)
    else:
        s = tl.div_rn(tl.full((BLOCK_T, BLOCK_E), 1.0, tl.float32), 1.0 + _exp(-logit, LIBDEVICE))
        s = s.to(dt).to(tl.float32)
    tl.store(scores_ptr + t[:, None] * E + e[None, :], s, mask=t_ok[:, None] & e_ok[None, :])


@triton.jit
def _route_select_kernel(scores_ptr, bias_ptr, stride_bias, ids_ptr, stride_ids, table_ptr, stride_tv, stride_tk,
                         weights_ptr, indices_ptr, N, E, scaling, K: tl.constexpr, BLOCK_T: tl.constexpr,
                         BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr, HASH: tl.constexpr):
    """Top-k over a token's whole score row (or its tid2eid row), then renormalised, scaled weights."""
    t = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    t_ok = t < N
    if HASH:
        ids = tl.load(ids_ptr + t * stride_ids, mask=t_ok, other=0).to(tl.int64)
    else:
        e = tl.arange(0, BLOCK_E)
        e_ok = e < E
        s = tl.load(scores_ptr + t[:, None] * E + e[None, :], mask=t_ok[:, None] & e_ok[None, :], other=0.0)
        bias = tl.load(bias_ptr + e * stride_bias, mask=e_ok, other=0.0).to(tl.float32)
        # Padding experts and taken ones get a key below every float's (-2^40); K ≤ E keeps them unpicked.
        key = tl.where(e_ok[None, :], order_key(s + bias[None, :]), -1099511627776)
    kk = tl.arange(0, BLOCK_K)
    idx = tl.zeros((BLOCK_T, BLOCK_K), dtype=tl.int64)
    picked = tl.zeros((BLOCK_T, BLOCK_K), dtype=tl.float32)
    total = tl.zeros((BLOCK_T,), dtype=tl.float32)
    for j in tl.static_range(K):
        if HASH:
            pick = tl.load(table_ptr + ids * stride_tv + j * stride_tk, mask=t_ok, other=0).to(tl.int64)
            # −1 (or a bad entry ≥ E) reads nothing: weight 0.
            s_j = tl.load(scores_ptr + t * E + pick, mask=t_ok & (pick >= 0) & (pick < E), other=0.0)
        else:
            _, pick = argmax_lowest(key, e[None, :], BLOCK_E, 1)  # the lowest index among equal keys
            pick = pick.to(tl.int64)
            hit = e[None, :] == pick[:, None]  # one-hot
            key = tl.where(hit, -1099511627776, key)
            s_j = tl.sum(tl.where(hit, s, 0.0), axis=1)  # exact: the hit plus zeros
        total += s_j  # slot order
        idx = tl.where(kk[None, :] == j, pick[:, None], idx)
        picked = tl.where(kk[None, :] == j, s_j[:, None], picked)
    # div_rn: IEEE division, as torch's (Triton's `/` need not round to nearest); it does not broadcast.
    w = tl.div_rn(picked, tl.broadcast_to(total[:, None] + 1e-20, (BLOCK_T, BLOCK_K))) * scaling
    out = t[:, None] * K + kk[None, :]
    ok = t_ok[:, None] & (kk[None, :] < K)
    tl.store(weights_ptr + out, w, mask=ok)
    tl.store(indices_ptr + out, idx, mask=ok)


_ROUTE_BLOCK_T = 16  # tokens per program: tl.dot's smallest M; fixed, never chosen from N (batch invariance)
# Experts per scores program: tl.dot's smallest N, so the most programs share gate_w at decode (16 at E = 256,
# 128 KB of bf16 gate_w each at D = 4096). Larger tiles would reread x less at prefill; untuned.
_ROUTE_BLOCK_E = 16
_ROUTE_MAX_E = 1024  # the select kernel holds a token tile's [BLOCK_T, E] scores and int64 keys in registers
# Tokens per select program (no tl.dot there, so below 16): ptxas for sm_90 at E = 256, K = 6 gives 16 tokens
# 255 registers and spills, 4 tokens 64 registers (8 warps); at E = 1024, 114. Fixed, never chosen from N.
_ROUTE_SELECT_BLOCK_T = 4


def _route_config(e: int, d: int) -> tuple[int, int, int]:
    """(BLOCK_D of the scores kernel; BLOCK_E, num_warps of the select kernel) from E and D only (batch
    invariance). The scores kernel's x and gate_w tiles stay ≤ 4k elements. Untuned (no GPU measurement yet)."""
    block_d = max(16, min(256, next_pow2(d)))
    block_e = max(16, next_pow2(e))
    return block_d, block_e, 8 if block_e >= 256 else 4


def _check_router(x, gate_w, scoring_func):
    check_tensor("x", x, ndim=2, dtypes=FLOAT_DTYPES, unit_last=True)
    n, d = (int(v) for v in x.shape)
    check_tensor("gate_w", gate_w, ndim=2, dtypes=(x.dtype,), device=x.device, unit_last=True)
    num_experts = int(gate_w.shape[0])
    check(gate_w.shape[1] == d, f"gate_w: expected [E, D={d}], got {tuple(gate_w.shape)}")
    check(1 <= num_experts <= _ROUTE_MAX_E, f"gate_w: {num_experts} experts outside [1, {_ROUTE_MAX_E}]")
    check(scoring_func in SCORING_FUNCS, f"unknown scoring_func {scoring_func!r}; expected one of {SCORING_FUNCS}")
    return n, d, num_experts


def _launch_route(x, gate_w, bias, input_ids, tid2eid, k, scoring_func, scaling, *, hashed):
    n, d = (int(v) for v in x.shape)
    num_experts = int(gate_w.shape[0])
    weights = torch.empty((n, k), dtype=torch.float32, device=x.device)
    indices = torch.empty((n, k), dtype=torch.long, device=x.device)
    if k == 0:
        return weights, indices
    block_d, block_e, warps = _route_config(num_experts, d)
    if hashed:  # stand in for the unused bias with an input (never dereferenced)
        bias, bias_stride = x, 0
        ids_stride, tv_stride, tk_stride = input_ids.stride(0), tid2eid.stride(0), tid2eid.stride(1)
    else:
        bias_stride = bias.stride(0)
        input_ids = tid2eid = x
        ids_stride = tv_stride = tk_stride = 0
    scores = torch.empty((n, num_experts), dtype=torch.float32, device=x.device)  # [N, E], model-dtype values
    launch(_router_scores_kernel, (cdiv(n, _ROUTE_BLOCK_T), cdiv(num_experts, _ROUTE_BLOCK_E)), x, x.stride(0),
           gate_w, gate_w.stride(0), scores, n, num_experts, d, BLOCK_T=_ROUTE_BLOCK_T, BLOCK_E=_ROUTE_BLOCK_E,
           BLOCK_D=block_d, SQRTSOFTPLUS=scoring_func == "sqrtsoftplus", IEEE=x.dtype == torch.float32,
           LIBDEVICE=x.is_cuda, num_warps=4)
    launch(_route_select_kernel, (cdiv(n, _ROUTE_SELECT_BLOCK_T),), scores, bias, bias_stride, input_ids, ids_stride,
           tid2eid, tv_stride, tk_stride, weights, indices, n, num_experts, float(scaling), K=k,
           BLOCK_T=_ROUTE_SELECT_BLOCK_T, BLOCK_E=block_e, BLOCK_K=next_pow2(k), HASH=hashed, num_warps=warps)
    return weights, indices


@register("score_route")
def _score_route_triton(x: torch.Tensor, gate_w: torch.Tensor, bias: torch.Tensor, k: int, scoring_func: str,
                        scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """x [N, D] (fp32/fp16/bf16, unit last stride), gate_w [E, D] (x's dtype, unit last stride), bias [E]
    (float, any stride), 0 ≤ k ≤ E → (weights [N, k] fp32, indices [N, k] int64), contiguous.
    Meaning: `score_route_ref`."""
    n, d, num_experts = _check_router(x, gate_w, scoring_func)
    check_tensor("bias", bias, shape=(num_experts,), dtypes=FLOAT_DTYPES, device=x.device)
    check(isinstance(k, int) and 0 <= k <= num_experts, f"k must be an int in [0, E={num_experts}], got {k!r}")
    return _launch_route(x, gate_w, bias, None, None, k, scoring_func, scaling, hashed=False)


@register("hash_route")
def _hash_route_triton(x: torch.Tensor, gate_w: torch.Tensor, tid2eid: torch.Tensor, input_ids: torch.Tensor,
                       scoring_func: str, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """x [N, D] and gate_w [E, D] as `_score_route_triton`; tid2eid [V, K] and input_ids [N] int32/int64 (any
    strides) → (weights [N, K] fp32, indices [N, K] int64), contiguous. Meaning: `hash_route_ref`."""
    n, d, num_experts = _check_router(x, gate_w, scoring_func)
    check_tensor("tid2eid", tid2eid, ndim=2, dtypes=INDEX_DTYPES, device=x.device)
    check_tensor("input_ids", input_ids, shape=(n,), dtypes=INDEX_DTYPES, device=x.device)
    return _launch_route(x, gate_w, None, input_ids, tid2eid, int(tid2eid.shape[1]), scoring_func, scaling,
                         hashed=True)


def score_route(x, gate_w, bias, k: int, scoring_func: str, scaling: float, *, kernels: str = "auto"):
    """Score routing → (weights fp32 [N, K], indices int64 [N, K]); see `score_route_ref`."""
    if use_triton(kernels, x, gate_w, bias):
        return _score_route_triton(x, gate_w, bias, int(k), scoring_func, float(scaling))
    return score_route_ref(x, gate_w, bias, k, scoring_func, scaling)


def hash_route(x, gate_w, tid2eid, input_ids, scoring_func: str, scaling: float, *, kernels: str = "auto"):
    """Hash routing → (weights fp32 [N, K], indices int64 [N, K]); see `hash_route_ref`."""
    if use_triton(kernels, x, gate_w, tid2eid, input_ids):
        return _hash_route_triton(x, gate_w, tid2eid, input_ids, scoring_func, float(scaling))
    return hash_route_ref(x, gate_w, tid2eid, input_ids, scoring_func, scaling)


def swiglu_ref(gate: torch.Tensor, up: torch.Tensor, limit: float) -> torch.Tensor:
    return F.silu(gate.clamp(max=limit)) * up.clamp(min=-limit, max=limit)


def experts_ref(x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor, gate_up: torch.Tensor,
                down: torch.Tensor, limit: float, token_chunk: int = 64) -> torch.Tensor:
    """Σ_k weights[:, k] · expert_{indices[:, k]}(x) → [N, D] in x's dtype (fp32 accumulation).

    Each (token, slot) gathers its own expert's weights, so the reference has no host syncs; a
    slot with index -1 contributes exactly zero (the kernel will skip it outright). Tokens go in
    fixed-size chunks to bound the gathered-weight memory.
    """
    n, k = indices.shape
    inter = gate_up.shape[1] // 2
    out = torch.zeros(n, down.shape[1], dtype=torch.float32, device=x.device)
    for start in range(0, n, token_chunk):
        rows = slice(start, start + token_chunk)
        xc, idx, w = x[rows], indices[rows], weights[rows]
        live = idx >= 0
        safe = idx.clamp(min=0)
        for slot in range(k):
            h = torch.einsum("nd,nid->ni", xc, gate_up[safe[:, slot]])  # [n, 2I]
            y = torch.einsum("ni,ndi->nd", swiglu_ref(h[:, :inter], h[:, inter:], limit), down[safe[:, slot]])
            out[rows] += torch.where(live[:, slot, None], y.float() * w[:, slot, None], 0.0)
    return out.to(x.dtype)


def experts_sorted(x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor, gate_up: torch.Tensor,
                   down: torch.Tensor, limit: float) -> torch.Tensor:
    """`experts_ref`'s result with tokens grouped per expert: one matmul per expert that has tokens.

    For training and long prefills, where gathering one weight matrix per (token, slot) costs far
    more memory than the activations; it reads the group sizes back to the host, so it never runs
    inside a sync-free step.
    """
    k, num_experts = indices.shape[1], gate_up.shape[0]
    inter = gate_up.shape[1] // 2
    flat = indices.flatten()  # [N·K]
    order = torch.argsort(flat, stable=True)  # slots routed nowhere (−1) first, then expert 0, 1, ...
    sizes = torch.bincount(flat + 1, minlength=num_experts + 1).tolist()  # host read: group sizes
    out = torch.zeros(x.shape[0], down.shape[1], dtype=torch.float32, device=x.device)
    start = sizes[0]
    for e in range(num_experts):
        count = sizes[e + 1]
        if count:
            slots = order[start:start + count]
            token = slots // k
            h = x[token] @ gate_up[e].t()  # [count, 2I]
            y = swiglu_ref(h[:, :inter], h[:, inter:], limit) @ down[e].t()  # [count, D]
            out = out.index_add(0, token, y.float() * weights.flatten()[slots, None])
        start += count
    return out.to(x.dtype)


def experts_dense(x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor, gate_up: torch.Tensor,
                  down: torch.Tensor, limit: float) -> torch.Tensor:
    """`experts_ref`'s result with every expert run on every token, then weighted by the token's
    routing weight for it (exactly zero where it does not route there).

    E/K times the FLOPs, but E plain GEMMs instead of a weight copy per (token, slot), and no host
    reads: the fast sync-free path on CPU while E/K is small.
    """
    n, num_experts = indices.shape[0], gate_up.shape[0]
    inter = gate_up.shape[1] // 2
    live = indices >= 0
    safe = indices.clamp(min=0)
    # per (token, expert): summed routing weight, and whether any slot routes there at all
    w = torch.zeros(n, num_experts, dtype=torch.float32, device=x.device).scatter_add_(
        1, safe, torch.where(live, weights.float(), 0.0))
    routed = torch.zeros(n, num_experts, dtype=torch.long, device=x.device).scatter_add_(1, safe, live.long()) > 0
    out = torch.zeros(n, down.shape[1], dtype=torch.float32, device=x.device)
    for e in range(num_experts):
        h = x @ gate_up[e].t()  # [N, 2I]
        y = swiglu_ref(h[:, :inter], h[:, inter:], limit) @ down[e].t()  # [N, D]
        out += torch.where(routed[:, e, None], y.float() * w[:, e, None], 0.0)
    return out.to(x.dtype)


# ----------------------------------------------------------------------------------------------------
# Grouped experts for CUDA: a device-side tile plan, then two grouped GEMM kernels.

# Slots per tile. Fixed (never chosen from N), so a slot's result does not depend on which other slots
# share its tile: batch invariance (architecture.md §9). 16 is tl.dot's smallest M.
_BLOCK_M = 16


def expert_tiles(indices: torch.Tensor, num_experts: int, block_m: int = _BLOCK_M):
    """The grouped GEMMs' work list, built on the device without host reads.

    indices [N, K] (−1 = nowhere) → (order [S] int64: slot ids (n·K + k) sorted by expert, slots routed
    nowhere last; tile_expert, tile_row0, tile_rows [T] int32: tile t covers sorted rows
    [row0, row0 + rows) of one expert; rows = 0 marks an unused tile). S = N·K. T is a bound from shapes
    alone, cdiv(S, BLOCK_M) + min(E, S): every expert with slots adds at most one partial tile.
    """
    n, k = indices.shape
    s = n * k
    key = torch.where(indices.flatten() >= 0, indices.flatten(), num_experts)  # [S], nowhere → E
    order = torch.argsort(key, stable=True)  # [S]
    # scatter_add, not bincount: CUDA's bincount reads the input's max back to size its output.
    counts = torch.zeros(num_experts + 1, dtype=torch.long, device=indices.device).scatter_add_(
        0, key, torch.ones_like(key))[:num_experts]  # [E]
    starts = torch.cumsum(counts, 0) - counts  # [E] first sorted row of each expert
    tiles = (counts + block_m - 1) // block_m  # [E]
    tile_end = torch.cumsum(tiles, 0)  # [E]
    t = torch.arange(cdiv(s, block_m) + min(num_experts, s), device=indices.device)  # [T]
    e = torch.searchsorted(tile_end, t, right=True)  # [T] the tile's expert; E past the last tile
    used = e < num_experts
    ec = e.clamp(max=num_experts - 1)
    j = t - (tile_end[ec] - tiles[ec])  # the tile's index within its expert
    rows = torch.where(used, (counts[ec] - j * block_m).clamp(max=block_m), 0)
    row0 = torch.where(used, starts[ec] + j * block_m, 0)
    return order, ec.to(torch.int32), row0.to(torch.int32), rows.to(torch.int32)


@triton.jit
def _tile_rows(tile, tile_expert_ptr, tile_row0_ptr, order_ptr, rows, BLOCK_M: tl.constexpr):
    """A tile's expert, first sorted row, row offsets, live rows and their slot ids."""
    e = tl.load(tile_expert_ptr + tile).to(tl.int64)
    row0 = tl.load(tile_row0_ptr + tile).to(tl.int64)
    m = tl.arange(0, BLOCK_M)
    live = m < rows
    slot = tl.load(order_ptr + row0 + m, mask=live, other=0)  # [BM]
    return e, row0, m, live, slot


@triton.jit
def _moe_gate_up_kernel(x_ptr, stride_x, gu_ptr, order_ptr, tile_expert_ptr, tile_row0_ptr, tile_rows_ptr, h_ptr,
                        K, D, I, limit, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                        IEEE: tl.constexpr):
    """h[row, n-block] = swiglu(x[token]·gateᵀ, x[token]·upᵀ) for one tile's sorted rows (one expert)."""
    tile = tl.program_id(0)
    rows = tl.load(tile_rows_ptr + tile)
    if rows > 0:
        e, row0, m, live, slot = _tile_rows(tile, tile_expert_ptr, tile_row0_ptr, order_ptr, rows, BLOCK_M)
        token = slot // K  # [BM]
        n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = n < I
        w_gate = gu_ptr + e * 2 * I * D + n[None, :] * D  # [1, BN] rows of gate_up, read transposed
        w_up = w_gate + I * D
        acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for d0 in range(0, D, BLOCK_K):
            d = d0 + tl.arange(0, BLOCK_K)
            d_ok = d < D
            a = tl.load(x_ptr + token[:, None] * stride_x + d[None, :], mask=live[:, None] & d_ok[None, :], other=0.0)
            wg = tl.load(w_gate + d[:, None], mask=d_ok[:, None] & n_ok[None, :], other=0.0)  # [BK, BN]
            wu = tl.load(w_up + d[:, None], mask=d_ok[:, None] & n_ok[None, :], other=0.0)
            acc_g += dot(a, wg, IEEE)
            acc_u += dot(a, wu, IEEE)
        g = tl.minimum(acc_g, limit)
        u = tl.minimum(tl.maximum(acc_u, -limit), limit)
        h = g / (1.0 + tl.exp(-g)) * u
        tl.store(h_ptr + (row0 + m)[:, None] * I + n[None, :], h.to(h_ptr.dtype.element_ty),
                 mask=live[:, None] & n_ok[None, :])


@triton.jit
def _moe_down_kernel(h_ptr, dn_ptr, order_ptr, w_ptr, tile_expert_ptr, tile_row0_ptr, tile_rows_ptr, y_ptr, D, I,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, IEEE: tl.constexpr):
    """y[slot, n-block] = weight[slot] · h[row]·downᵀ, written at the slot's own position."""
    tile = tl.program_id(0)
    rows = tl.load(tile_rows_ptr + tile)
    if rows > 0:
        e, row0, m, live, slot = _tile_rows(tile, tile_expert_ptr, tile_row0_ptr, order_ptr, rows, BLOCK_M)
        n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = n < D
        w_down = dn_ptr + e * D * I + n[None, :] * I  # [1, BN] rows of down, read transposed
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for i0 in range(0, I, BLOCK_K):
            i = i0 + tl.arange(0, BLOCK_K)
            i_ok = i < I
            a = tl.load(h_ptr + (row0 + m)[:, None] * I + i[None, :], mask=live[:, None] & i_ok[None, :], other=0.0)
            b = tl.load(w_down + i[:, None], mask=i_ok[:, None] & n_ok[None, :], other=0.0)  # [BK, BN]
            acc += dot(a, b, IEEE)
        w = tl.load(w_ptr + slot, mask=live, other=0.0)
        tl.store(y_ptr + slot[:, None] * D + n[None, :], acc * w[:, None], mask=live[:, None] & n_ok[None, :])


def _blocks(elem_bytes: int) -> tuple[int, int]:
    """(BLOCK_N, BLOCK_K) by dtype only (batch invariance). Untuned (no GPU measurement yet)."""
    return (64, 64) if elem_bytes <= 2 else (32, 32)


@register("moe_experts")
def _experts_triton(x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor, gate_up: torch.Tensor,
                    down: torch.Tensor, limit: float) -> torch.Tensor:
    """x [N, D] (fp32/fp16/bf16, unit last stride), weights [N, K] fp32, indices [N, K] int (−1 = nowhere),
    gate_up [E, 2I, D] and down [E, D, I] contiguous in x's dtype → [N, D] in x's dtype.
    Meaning: `experts_ref`."""
    check_tensor("x", x, ndim=2, dtypes=FLOAT_DTYPES, unit_last=True)
    n, d = (int(v) for v in x.shape)
    dev = x.device
    check_tensor("indices", indices, ndim=2, dtypes=INDEX_DTYPES, device=dev)
    k = int(indices.shape[1])
    check(indices.shape[0] == n, f"indices: {indices.shape[0]} rows for {n} tokens")
    check_tensor("weights", weights, shape=(n, k), dtypes=(torch.float32,), device=dev)
    check_tensor("gate_up", gate_up, ndim=3, dtypes=(x.dtype,), device=dev, contiguous=True)
    num_experts, two_i = (int(v) for v in gate_up.shape[:2])
    check(two_i % 2 == 0 and gate_up.shape[2] == d, f"gate_up: expected [E, 2I, D={d}], got {tuple(gate_up.shape)}")
    inter = two_i // 2
    check_tensor("down", down, shape=(num_experts, d, inter), dtypes=(x.dtype,), device=dev, contiguous=True)
    order, tile_expert, tile_row0, tile_rows = expert_tiles(indices, num_experts)
    tiles = int(tile_rows.shape[0])
    h = torch.empty((n * k, inter), dtype=x.dtype, device=dev)  # SwiGLU output per sorted row
    y = torch.zeros((n * k, d), dtype=torch.float32, device=dev)  # per slot; slots routed nowhere stay 0
    block_n, block_k = _blocks(x.element_size())
    ieee = x.dtype == torch.float32
    launch(_moe_gate_up_kernel, (tiles, cdiv(inter, block_n)), x, x.stride(0), gate_up, order, tile_expert, tile_row0,
           tile_rows, h, k, d, inter, float(limit), BLOCK_M=_BLOCK_M, BLOCK_N=block_n, BLOCK_K=block_k, IEEE=ieee)
    launch(_moe_down_kernel, (tiles, cdiv(d, block_n)), h, down, order, weights.contiguous().view(n * k), tile_expert,
           tile_row0, tile_rows, y, d, inter, BLOCK_M=_BLOCK_M, BLOCK_N=block_n, BLOCK_K=block_k, IEEE=ieee)
    return y.view(n, k, d).sum(1).to(x.dtype)  # combine in slot order, per token


# On CPU, computing every expert beats gathering a weight copy per (token, slot) once there are
# enough tokens to amortise the E/K-fold FLOPs: tools/bench_experts.py (1 thread, nano's widths;
# bench/results/experts-cpu/table.txt) measured 1.46× at E/K = 4, N = 8, 1.68× at E/K = 8, N = 64,
# 0.95× at E/K = 16, N = 64 (the rule's margin) and a loss at E/K = 32 for every N.
DENSE_MAX_RATIO = 16
DENSE_MIN_TOKENS_PER_RATIO = 2


def experts(x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor, gate_up: torch.Tensor,
            down: torch.Tensor, limit: float, *, kernels: str = "auto") -> torch.Tensor:
    """Routed experts, the one place their path is chosen. Training (autograd recording through gate_up):
    `experts_sorted`, whatever `kernels` says. Inference, sync-free: the grouped Triton kernels on CUDA; on CPU
    `experts_dense` where it is faster (decided from static shapes), else the reference."""
    if torch.is_grad_enabled() and gate_up.requires_grad:
        # The gather reference would hold a weight copy per (token, slot), and the kernels are forward-only.
        return experts_sorted(x, weights, indices, gate_up, down, limit)
    if use_triton(kernels, x, weights, indices, gate_up, down):
        return _experts_triton(x, weights, indices, gate_up, down, float(limit))
    ratio = gate_up.shape[0] / indices.shape[1]
    if x.device.type == "cpu" and ratio <= DENSE_MAX_RATIO and x.shape[0] >= DENSE_MIN_TOKENS_PER_RATIO * ratio:
        return experts_dense(x, weights, indices, gate_up, down, limit)
    return experts_ref(x, weights, indices, gate_up, down, limit)
