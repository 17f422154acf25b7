"""The Markov head's per-slot correction of the draft logits (dspark.md §2.1): Ũ = U + W2·x.

Layouts: R requests, V vocabulary, r Markov rank.

    logits  [R, V] fp32     the draft backbone's logits U for this slot
    x       [R, r]          the head's r-vector for this slot (model dtype)
    w2      [V, r]          markov_w2.weight (model dtype, rows contiguous)
    out     [R, V] fp32     U + (x·W2ᵀ rounded to the model dtype), as the eager `U + markov_w2(x).float()`

It runs γ times per round, one slot after another, so on a GPU its launches and its read of W2 are
the sequential head's whole cost. The kernel fuses the GEMV with the add: one program per block of
BLOCK_V vocabulary rows and 16 requests reads that slice of W2 once (a tl.dot over the rank), rounds
the product to the model dtype like the eager linear, adds U and writes fp32. Tile sizes are fixed, so
the reduction over r runs in one order whatever R is (batch invariance).
"""

from __future__ import annotations

import torch

from dspark.ops._launch import (FLOAT_DTYPES, cdiv, check, check_tensor, dot, launch, next_pow2, register, tl, triton,
                                use_triton)


def markov_logits_ref(logits: torch.Tensor, x: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    return logits.float() + torch.nn.functional.linear(x, w2).float()


@triton.jit
def _markov_logits_kernel(u_ptr, stride_u, x_ptr, stride_x, w_ptr, stride_w, out_ptr, R, V, RANK,
                          BLOCK_R: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, IEEE: tl.constexpr):
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
    tl.store(out_ptr + r[:, None] * V + v[None, :], u + bias, mask=ok)


@register("markov_logits")
def _markov_logits_triton(logits: torch.Tensor, x: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """logits [R, V] (float, unit last stride), x [R, r] and w2 [V, r] (one float dtype, unit last strides)
    → [R, V] fp32, contiguous. Meaning: `markov_logits_ref`."""
    check_tensor("logits", logits, ndim=2, dtypes=FLOAT_DTYPES, unit_last=True)
    r, v = (int(s) for s in logits.shape)
    dev = logits.device
    check_tensor("x", x, ndim=2, dtypes=FLOAT_DTYPES, device=dev, unit_last=True)
    rank = int(x.shape[1])
    check(x.shape[0] == r, f"x: {x.shape[0]} rows for {r} logits rows")
    check_tensor("w2", w2, shape=(v, rank), dtypes=(x.dtype,), device=dev, unit_last=True)
    out = torch.empty((r, v), dtype=torch.float32, device=dev)
    # Fixed tile sizes (batch invariance: a row's result never depends on how many rows run with it);
    # every 16 requests re-read the W2 slice. Untuned (no GPU measurement yet).
    block_r = 16
    block_k = max(16, min(next_pow2(rank), 64))
    block_v = 128 if x.element_size() <= 2 else 64
    launch(_markov_logits_kernel, (cdiv(v, block_v), cdiv(r, block_r)), logits, logits.stride(0), x, x.stride(0), w2,
           w2.stride(0), out, r, v, rank, BLOCK_R=block_r, BLOCK_V=block_v, BLOCK_K=block_k,
           IEEE=x.dtype == torch.float32)
    return out


def markov_logits(logits: torch.Tensor, x: torch.Tensor, w2: torch.Tensor, *, impl: str = "auto") -> torch.Tensor:
    """Ũ = U + W2·x for one slot → [R, V] fp32; see the module docstring."""
    if use_triton(impl, logits, x, w2):
        return _markov_logits_triton(logits, x, w2)
    return markov_logits_ref(logits, x, w2)
