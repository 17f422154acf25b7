"""The Markov head's per-slot correction of the draft logits (dspark.md §2.1): Ũ = U + W2·x, and the
fused op that also draws the slot's token from probs(Ũ).

Layouts: R requests, V vocabulary, r Markov rank.

    logits       [R, V] fp32     the draft backbone's logits U for this slot
    x            [R, r]          the head's r-vector for this slot (model dtype)
    w2           [V, r]          markov_w2.weight (model dtype, rows contiguous)
    out          [R, V] fp32     U + (x·W2ᵀ rounded to the model dtype), as the eager `U + markov_w2(x).float()`
    temperature, top_k, top_p, u [R]   as in ops/sampling.py (any may be None: greedy / off for every row)
    tokens       [R] int64       `markov_sample`: sample(probs(Ũ, temperature, top_k, top_p), u)

It runs γ times per round, one slot after another, so on a GPU its launches and its read of W2 are
the sequential head's whole cost. The kernel fuses the GEMV with the add: one program per block of
BLOCK_V vocabulary rows and 16 requests reads that slice of W2 once (a tl.dot over the rank), rounds
the product to the model dtype like the eager linear, adds U and writes fp32. Tile sizes are fixed, so
the reduction over r runs in one order whatever R is (batch invariance).

`markov_sample` replaces the slot's three launches (markov_logits, probs, sample) with two. The first is
the tile above, which also stores per-row partials of its tile: the max of Ũ (−0.0 read as +0.0) and its
lowest index. The second finishes one row per program: max and argmax from the partials in tile order
(saving a pass; the lowest index wins ties), then greedy rows store the argmax and sampled rows run
`ops.sampling.sample_row`, the sampling kernel's own row body (filter searches, integer weights,
inverse CDF). Every reduction runs in a fixed order over fixed tiles, so a row's Ũ and token never depend
on which rows share the batch. Tokens equal `sample_ref(probs_ref(Ũ, ...), u)` exactly (the integer
recipe of ops/sampling.py), and Ũ is bit-identical to `markov_logits`' kernel (same tiles, same code).

Why two launches and not one with a last-block finish: the tile grid shares each W2 slice among 16
requests, so the last program of a request block would finish 16 rows one after another on one SM
(≈ 16 × 3 passes over V), where the finish kernel runs them on 16 SMs at once; and a completion counter
needs a zeroed workspace, one more launch unless it is static. Passes over a row's V in the finish: none
for a greedy row; for a sampled row the filter searches (≤ 9 each, as in the sampling kernel), the kept
mass, the measure and the inverse-CDF passes; the three-launch path adds a max pass, the probs write and
the probs-max pass.
"""

from __future__ import annotations

import torch

from dspark.ops._launch import (FLOAT_DTYPES, cdiv, check, check_tensor, dot, launch, next_pow2, register, tl, triton,
                                use_triton)
from dspark.ops._select import NCAND, argmax_lowest, positive_zero
from dspark.ops.sampling import (check_filter_args, fixed_bits, params_or_off, sample_logits_ref, sample_row,
                                 vocab_block)


def markov_logits_ref(logits: torch.Tensor, x: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    return logits.float() + torch.nn.functional.linear(x, w2).float()


def markov_sample_ref(logits: torch.Tensor, x: torch.Tensor, w2: torch.Tensor, temperature: torch.Tensor,
                      top_k: torch.Tensor | None, top_p: torch.Tensor | None, u: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """(Ũ [R, V] fp32, tokens [R] int64): `markov_logits_ref`, then `sample_logits_ref`, which is by
    definition `sample_ref(probs_ref(Ũ, ...), u)`."""
    corrected = markov_logits_ref(logits, x, w2)  # [R, V] fp32
    return corrected, sample_logits_ref(corrected, temperature, top_k, top_p, u)


@triton.jit
def _corrected_tile(u_ptr, stride_u, x_ptr, stride_x, w_ptr, stride_w, out_ptr, R, V, RANK, BLOCK_R: tl.constexpr,
                    BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, IEEE: tl.constexpr):
    """Ũ for this program's [BLOCK_R requests, BLOCK_V tokens] tile, stored → (Ũ tile fp32, r, v, r_ok, v_ok)."""
    v = tl.program_id(0) * BLOCK_V + tl.arange(0, BLOCK_V)
    v_ok = v < V
    r = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    r_ok = r < R
    acc = tl.zeros((BLOCK_R, BLOCK_V), dtype=tl.float32)
    for k0 in range(0, RANK, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_ok = k < RANK
        xs = tl.load(x_ptr + r[:, None] * stride_x + k[None, :], mask=r_ok[:, None] & k_ok[None, :], other=0.0)
        ws = tl.load(w_ptr + v[None, :] * stride_w + k[:, None], mask=k_ok[:, None] & v_ok[None, :], other=0.0)
        acc += dot(xs, ws, IEEE)  # [BLOCK_R, BLOCK_V]
    bias = acc.to(x_ptr.dtype.element_ty).to(tl.float32)  # the eager linear's output dtype
    ok = r_ok[:, None] & v_ok[None, :]
    u = tl.load(u_ptr + r[:, None] * stride_u + v[None, :], mask=ok, other=0.0).to(tl.float32)
    corrected = u + bias
    tl.store(out_ptr + r[:, None] * V + v[None, :], corrected, mask=ok)
    return corrected, r, v, r_ok, v_ok


@triton.jit
def _markov_logits_kernel(u_ptr, stride_u, x_ptr, stride_x, w_ptr, stride_w, out_ptr, R, V, RANK,
                          BLOCK_R: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, IEEE: tl.constexpr):
    _corrected_tile(u_ptr, stride_u, x_ptr, stride_x, w_ptr, stride_w, out_ptr, R, V, RANK, BLOCK_R, BLOCK_V,
                    BLOCK_K, IEEE)


@triton.jit
def _markov_partials_kernel(u_ptr, stride_u, x_ptr, stride_x, w_ptr, stride_w, out_ptr, R, V, RANK, tile_max_ptr,
                            tile_arg_ptr, N_TILES, BLOCK_R: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
                            IEEE: tl.constexpr):
    """The Ũ tile of (vocabulary tile, request block), plus each row's tile max and its lowest index."""
    tile = tl.program_id(0)
    corrected, r, v, r_ok, v_ok = _corrected_tile(u_ptr, stride_u, x_ptr, stride_x, w_ptr, stride_w, out_ptr, R, V,
                                                  RANK, BLOCK_R, BLOCK_V, BLOCK_K, IEEE)
    cx = positive_zero(corrected)  # −0.0 as +0.0, as sampling's row max reads it
    cx = tl.where(v_ok[None, :], cx, -float("inf"))
    tmax, targ = argmax_lowest(cx, tl.where(v_ok, v, V)[None, :], V, 1)
    tl.store(tile_max_ptr + r * N_TILES + tile, tmax, mask=r_ok)
    tl.store(tile_arg_ptr + r * N_TILES + tile, targ, mask=r_ok)


@triton.jit
def _markov_finish_kernel(out_ptr, V, temperature_ptr, stride_t, top_k_ptr, stride_k, top_p_ptr, stride_p, uni_ptr,
                          stride_uni, tokens_ptr, tile_max_ptr, tile_arg_ptr, N_TILES, F: tl.constexpr,
                          BLOCK_S: tl.constexpr, NCAND: tl.constexpr):
    """One row's token from its complete Ũ row and tile partials."""
    row = tl.program_id(0).to(tl.int64)
    lanes = tl.arange(0, BLOCK_S)
    best = tl.full([BLOCK_S], -float("inf"), tl.float32)
    best_i = tl.zeros([BLOCK_S], dtype=tl.int32)
    for j0 in range(0, N_TILES, BLOCK_S):  # partials in tile order: the lowest index wins ties
        j = j0 + lanes
        tm = tl.load(tile_max_ptr + row * N_TILES + j, mask=j < N_TILES, other=-float("inf"))
        ta = tl.load(tile_arg_ptr + row * N_TILES + j, mask=j < N_TILES, other=0)
        better = tm > best
        best = tl.where(better, tm, best)
        best_i = tl.where(better, ta, best_i)
    m, arg = argmax_lowest(best, best_i, V, 0)
    t = tl.load(temperature_ptr + row * stride_t)
    if t <= 0.0:
        # Greedy: probs is one-hot at arg, which the inverse CDF returns for every u (the fallback included).
        tl.store(tokens_ptr + row, arg.to(tl.int64))
    else:
        k = tl.load(top_k_ptr + row * stride_k).to(tl.int64)
        top_p = tl.load(top_p_ptr + row * stride_p)
        u = tl.load(uni_ptr + row * stride_uni)
        sample_row(out_ptr + row * V, V, t, k, top_p, u, m, arg, out_ptr, tokens_ptr + row, F, BLOCK_S, NCAND,
                   True, True, False, True)


def _tiles(x: torch.Tensor, rank: int) -> tuple[int, int, int]:
    # Fixed tile sizes (batch invariance: a row's result never depends on how many rows run with it);
    # every 16 requests re-read the W2 slice. Untuned (no GPU measurement yet).
    block_r = 16
    block_k = max(16, min(next_pow2(rank), 64))
    block_v = 128 if x.element_size() <= 2 else 64
    return block_r, block_v, block_k


def _check_markov_args(logits: torch.Tensor, x: torch.Tensor, w2: torch.Tensor) -> int:
    """Validate U / x / W2 → the rank."""
    check_tensor("logits", logits, ndim=2, dtypes=FLOAT_DTYPES, unit_last=True)
    r, v = (int(s) for s in logits.shape)
    dev = logits.device
    check_tensor("x", x, ndim=2, dtypes=FLOAT_DTYPES, device=dev, unit_last=True)
    rank = int(x.shape[1])
    check(x.shape[0] == r, f"x: {x.shape[0]} rows for {r} logits rows")
    check_tensor("w2", w2, shape=(v, rank), dtypes=(x.dtype,), device=dev, unit_last=True)
    return rank


@register("markov_logits")
def _markov_logits_triton(logits: torch.Tensor, x: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """logits [R, V] (float, unit last stride), x [R, r] and w2 [V, r] (one float dtype, unit last strides)
    → [R, V] fp32, contiguous. Meaning: `markov_logits_ref`."""
    rank = _check_markov_args(logits, x, w2)
    r, v = (int(s) for s in logits.shape)
    out = torch.empty((r, v), dtype=torch.float32, device=logits.device)
    block_r, block_v, block_k = _tiles(x, rank)
    launch(_markov_logits_kernel, (cdiv(v, block_v), cdiv(r, block_r)), logits, logits.stride(0), x, x.stride(0), w2,
           w2.stride(0), out, r, v, rank, BLOCK_R=block_r, BLOCK_V=block_v, BLOCK_K=block_k,
           IEEE=x.dtype == torch.float32)
    return out


@register("markov_sample")
def _markov_sample_triton(logits: torch.Tensor, x: torch.Tensor, w2: torch.Tensor, temperature: torch.Tensor,
                          top_k: torch.Tensor, top_p: torch.Tensor, u: torch.Tensor
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """As `_markov_logits_triton`, plus temperature [R] fp32, top_k [R] int32/int64, top_p [R] fp32 and u [R]
    fp32 (any strides) → (Ũ [R, V] fp32 contiguous, tokens [R] int64). Meaning: `markov_sample_ref`."""
    check_filter_args(logits, temperature, top_k, top_p)
    rank = _check_markov_args(logits, x, w2)
    r, v = (int(s) for s in logits.shape)
    dev = logits.device
    check_tensor("u", u, shape=(r,), dtypes=(torch.float32,), device=dev)
    block_r, block_v, block_k = _tiles(x, rank)
    n_tiles = cdiv(v, block_v)
    out = torch.empty((r, v), dtype=torch.float32, device=dev)
    tokens = torch.empty(r, dtype=torch.long, device=dev)
    tile_max = torch.empty((r, n_tiles), dtype=torch.float32, device=dev)  # per-(row, tile) partials
    tile_arg = torch.empty((r, n_tiles), dtype=torch.int32, device=dev)
    launch(_markov_partials_kernel, (n_tiles, cdiv(r, block_r)), logits, logits.stride(0), x, x.stride(0), w2,
           w2.stride(0), out, r, v, rank, tile_max, tile_arg, n_tiles, BLOCK_R=block_r, BLOCK_V=block_v,
           BLOCK_K=block_k, IEEE=x.dtype == torch.float32)
    launch(_markov_finish_kernel, (r,), out, v, temperature, temperature.stride(0), top_k, top_k.stride(0), top_p,
           top_p.stride(0), u, u.stride(0), tokens, tile_max, tile_arg, n_tiles, F=fixed_bits(v),
           BLOCK_S=vocab_block(v), NCAND=NCAND)
    return out, tokens


def markov_logits(logits: torch.Tensor, x: torch.Tensor, w2: torch.Tensor, *, kernels: str = "auto") -> torch.Tensor:
    """Ũ = U + W2·x for one slot → [R, V] fp32; see the module docstring."""
    if use_triton(kernels, logits, x, w2):
        return _markov_logits_triton(logits, x, w2)
    return markov_logits_ref(logits, x, w2)


def markov_sample(logits: torch.Tensor, x: torch.Tensor, w2: torch.Tensor, temperature: torch.Tensor,
                  top_k: torch.Tensor | None, top_p: torch.Tensor | None, u: torch.Tensor, *, kernels: str = "auto"
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """One slot in one launch → (Ũ [R, V] fp32, tokens [R] int64); see `markov_sample_ref`."""
    if use_triton(kernels, logits, x, w2, u):
        return _markov_sample_triton(logits, x, w2, *params_or_off(temperature, top_k, top_p, logits), u)
    return markov_sample_ref(logits, x, w2, temperature, top_k, top_p, u)
