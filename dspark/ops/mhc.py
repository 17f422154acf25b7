"""Manifold-constrained hyper-connections (mHC): V4's N residual streams per token.

Layouts: `...` any leading token dims (T tokens flattened), N streams, D hidden.

    streams [..., N, D]           the residual streams (model dtype)
    fn      [(2+N)·N, N·D]        projection to (pre, post, comb) logits, fp32
    base    [(2+N)·N], scale [3]  fp32

`hc_weights_ref` returns pre [..., N], post [..., N], comb [..., N, N] in fp32 (deepseek_v4.md §4.2):
pre = σ(s_pre·μ_pre + b) + eps, post = 2σ(...), comb = Sinkhorn(softmax_rows(...) + eps) starting and
ending on a column normalisation, eps in every denominator. `hc_collapse_ref` is Σ_n pre[n]·X[n];
`hc_expand_ref` is the block's residual update X'[n] = post[n]·y + Σ_j comb[j, n]·X[j] (note the
contraction over comb's FIRST index).

Kernels (fp32 arithmetic, model-dtype loads and stores):
- `_hc_weights_kernel`: one program per BLOCK_T tokens streams X once for Σx² and the (2+N)·N
  projections (μ = rms · (X @ fnᵀ), the rms applied after the dot), then sigmoid / softmax / Sinkhorn in
  registers with the reference's normalisation order; COLLAPSE re-reads X (from L2) for Σ pre·X.
  HEAD is `hc_head` (N outputs, one scale, no Sinkhorn).
- `_hc_collapse_kernel` and `_hc_expand_kernel`: token × D tiles.
Batch invariance: tile sizes depend on N only, never on T, and every reduction runs in a fixed order
(K chunks in sequence, fixed-shape `tl.sum`s, streams j = 0..N−1 in order), so a token's outputs are
bit-identical whatever else is in the batch. Against the references the floats agree to fp32
tolerance only (different summation order, rsqrt/exp/sigmoid implementations, FMA contraction).
"""

from __future__ import annotations

import torch

from dspark.ops._launch import (FLOAT_DTYPES, cdiv, check, check_tensor, launch, next_pow2, register, tl, triton,
                                use_triton)


def _unweighted_rms(x: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.square().mean(-1, keepdim=True) + eps)


def hc_weights_ref(streams: torch.Tensor, fn: torch.Tensor, base: torch.Tensor, scale: torch.Tensor,
                   sinkhorn_iters: int, hc_eps: float, rms_eps: float):
    n = streams.shape[-2]
    flat = _unweighted_rms(streams.flatten(-2).float(), rms_eps)  # [..., N·D]
    mu = flat @ fn.float().t()  # [..., (2+N)·N]
    mu_pre, mu_post, mu_comb = mu.split([n, n, n * n], dim=-1)
    b_pre, b_post, b_comb = base.float().split([n, n, n * n])
    s_pre, s_post, s_comb = scale.float().unbind(0)
    pre = torch.sigmoid(mu_pre * s_pre + b_pre) + hc_eps
    post = 2 * torch.sigmoid(mu_post * s_post + b_post)
    comb = torch.softmax((mu_comb * s_comb + b_comb).unflatten(-1, (n, n)), dim=-1) + hc_eps  # [..., N, N]
    comb = comb / (comb.sum(dim=-2, keepdim=True) + hc_eps)
    for _ in range(sinkhorn_iters - 1):
        comb = comb / (comb.sum(dim=-1, keepdim=True) + hc_eps)
        comb = comb / (comb.sum(dim=-2, keepdim=True) + hc_eps)
    return pre, post, comb


def hc_collapse_ref(pre: torch.Tensor, streams: torch.Tensor) -> torch.Tensor:
    """[..., N] fp32 weights × [..., N, D] streams → [..., D] in the streams' dtype."""
    return (pre.unsqueeze(-1) * streams.float()).sum(dim=-2).to(streams.dtype)


def hc_expand_ref(post: torch.Tensor, comb: torch.Tensor, block_out: torch.Tensor,
                  streams: torch.Tensor) -> torch.Tensor:
    """X'[n] = post[n]·y + Σ_j comb[j, n]·X[j], computed in fp32, returned in the streams' dtype."""
    mixed = torch.einsum("...jn,...jd->...nd", comb, streams.float())
    return (post.unsqueeze(-1) * block_out.float().unsqueeze(-2) + mixed).to(streams.dtype)


def hc_head_ref(streams: torch.Tensor, hc_fn: torch.Tensor, hc_base: torch.Tensor, hc_scale: torch.Tensor,
                hc_eps: float, rms_eps: float) -> torch.Tensor:
    """Final collapse of the N streams: σ(scale·μ + base) + eps weights, no Sinkhorn. → [..., D]."""
    flat = _unweighted_rms(streams.flatten(-2).float(), rms_eps)
    pre = torch.sigmoid((flat @ hc_fn.float().t()) * hc_scale.float() + hc_base.float()) + hc_eps
    return hc_collapse_ref(pre, streams)


def hc_weights_collapse_ref(streams, fn, base, scale, sinkhorn_iters, hc_eps, rms_eps):
    """(pre, post, comb, hc_collapse(pre, streams)) in one call; the fused kernel reads the streams once
    for the weights and once (from L2) for the collapse."""
    pre, post, comb = hc_weights_ref(streams, fn, base, scale, sinkhorn_iters, hc_eps, rms_eps)
    return pre, post, comb, hc_collapse_ref(pre, streams)


# ----------------------------------------------------------------------------------------------------
# Triton kernels.

_BLOCK_T = 16  # tokens per program; fixed so results never depend on how many tokens are in flight
_BLOCK_D = 64


def _block_k(np2: int) -> int:
    # The comb projection is a [BLOCK_T, NP², BLOCK_K] product per K chunk: keep it at 8k fp32
    # (64 registers per thread with 4 warps). Depends on N only (batch invariance).
    return max(8, 512 // (np2 * np2))


@triton.jit
def _collapse_tile(pre, x_ptr, stride_xt, out_ptr, t, t_ok, N, D, d0, NP: tl.constexpr, BLOCK_D: tl.constexpr):
    """out[t, d0:d0+BLOCK_D] = Σ_n pre[t, n]·X[t, n, d] for pre [BLOCK_T, NP] fp32, summed over n in one
    fixed-shape reduction; stored in out's dtype."""
    n_i = tl.arange(0, NP)
    dd = d0 + tl.arange(0, BLOCK_D)
    ok = t_ok[:, None, None] & (n_i < N)[None, :, None] & (dd < D)[None, None, :]
    x = tl.load(x_ptr + t[:, None, None] * stride_xt + n_i[None, :, None] * D + dd[None, None, :], mask=ok,
                other=0.0).to(tl.float32)  # [BLOCK_T, NP, BLOCK_D]
    y = tl.sum(pre[:, :, None] * x, axis=1)
    tl.store(out_ptr + t[:, None] * D + dd[None, :], y.to(out_ptr.dtype.element_ty),
             mask=t_ok[:, None] & (dd < D)[None, :])


@triton.jit
def _hc_weights_kernel(x_ptr, stride_xt, fn_ptr, base_ptr, scale_ptr, pre_ptr, post_ptr, comb_ptr, out_ptr,
                       T, N, D, sinkhorn_iters, hc_eps, rms_eps, NP: tl.constexpr, BLOCK_T: tl.constexpr,
                       BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, HEAD: tl.constexpr,
                       WRITE_WEIGHTS: tl.constexpr, COLLAPSE: tl.constexpr):
    t = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    t_ok = t < T
    K = N * D
    n_i = tl.arange(0, NP)
    n_ok = n_i < N
    c_i = tl.arange(0, NP * NP) // NP  # comb entry (i, j) at flat index i·NP + j
    c_j = tl.arange(0, NP * NP) % NP
    c_ok = (c_i < N) & (c_j < N)

    # Pass 1: Σx² and the projections, K in fixed BLOCK_K chunks.
    sumsq = tl.zeros([BLOCK_T, BLOCK_K], dtype=tl.float32)
    mu_pre = tl.zeros([BLOCK_T, NP], dtype=tl.float32)
    mu_post = tl.zeros([BLOCK_T, NP], dtype=tl.float32)
    mu_comb = tl.zeros([BLOCK_T, NP * NP], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        k_ok = kk < K
        x = tl.load(x_ptr + t[:, None] * stride_xt + kk[None, :], mask=t_ok[:, None] & k_ok[None, :],
                    other=0.0).to(tl.float32)  # [BLOCK_T, BLOCK_K]
        sumsq += x * x
        f = tl.load(fn_ptr + n_i[:, None] * K + kk[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0)
        mu_pre += tl.sum(x[:, None, :] * f[None, :, :], axis=2)
        if not HEAD:
            f = tl.load(fn_ptr + (N + n_i)[:, None] * K + kk[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0)
            mu_post += tl.sum(x[:, None, :] * f[None, :, :], axis=2)
            f = tl.load(fn_ptr + (2 * N + c_i * N + c_j)[:, None] * K + kk[None, :],
                        mask=c_ok[:, None] & k_ok[None, :], other=0.0)  # [NP², BLOCK_K]
            mu_comb += tl.sum(x[:, None, :] * f[None, :, :], axis=2)
    ssq = tl.sum(sumsq, axis=1)
    rms = tl.rsqrt(tl.math.div_rn(ssq, tl.zeros_like(ssq) + K) + rms_eps)[:, None]  # [BLOCK_T, 1]

    b_pre = tl.load(base_ptr + n_i, mask=n_ok, other=0.0)
    pre = tl.sigmoid(mu_pre * rms * tl.load(scale_ptr) + b_pre[None, :]) + hc_eps
    if WRITE_WEIGHTS:
        w_ok = t_ok[:, None] & n_ok[None, :]
        tl.store(pre_ptr + t[:, None] * N + n_i[None, :], pre, mask=w_ok)
        if not HEAD:
            b_post = tl.load(base_ptr + N + n_i, mask=n_ok, other=0.0)
            post = 2.0 * tl.sigmoid(mu_post * rms * tl.load(scale_ptr + 1) + b_post[None, :])
            tl.store(post_ptr + t[:, None] * N + n_i[None, :], post, mask=w_ok)

            # comb: row softmax + eps, column normalisation, then (rows, columns) × (iters − 1); padded
            # entries stay exactly 0 and never enter a sum.
            b_comb = tl.load(base_ptr + 2 * N + c_i * N + c_j, mask=c_ok, other=0.0)
            logits = tl.reshape(mu_comb * rms * tl.load(scale_ptr + 2) + b_comb[None, :], (BLOCK_T, NP, NP))
            valid = ((tl.arange(0, NP)[:, None] < N) & (tl.arange(0, NP)[None, :] < N))[None, :, :]
            logits = tl.where(valid, logits, -float("inf"))
            row_max = tl.max(logits, axis=2)
            row_max = tl.where(row_max == -float("inf"), 0.0, row_max)  # padded rows: no inf − inf
            e = tl.where(valid, tl.exp(logits - row_max[:, :, None]), 0.0)
            row_sum = tl.sum(e, axis=2)
            row_sum = tl.where(row_sum == 0.0, 1.0, row_sum)  # padded rows only
            comb = tl.where(valid, tl.math.div_rn(e, row_sum[:, :, None]) + hc_eps, 0.0)
            comb = tl.math.div_rn(comb, tl.sum(comb, axis=1)[:, None, :] + hc_eps)
            for _ in range(sinkhorn_iters - 1):
                comb = tl.math.div_rn(comb, tl.sum(comb, axis=2)[:, :, None] + hc_eps)
                comb = tl.math.div_rn(comb, tl.sum(comb, axis=1)[:, None, :] + hc_eps)
            i3 = tl.arange(0, NP)[None, :, None]
            j3 = tl.arange(0, NP)[None, None, :]
            tl.store(comb_ptr + t[:, None, None] * (N * N) + i3 * N + j3, comb, mask=t_ok[:, None, None] & valid)

    if COLLAPSE:  # pass 2: Σ_n pre[n]·X[n], X re-read from L2
        for d0 in range(0, D, BLOCK_D):
            _collapse_tile(pre, x_ptr, stride_xt, out_ptr, t, t_ok, N, D, d0, NP, BLOCK_D)


@triton.jit
def _hc_collapse_kernel(pre_ptr, x_ptr, stride_xt, out_ptr, T, N, D, NP: tl.constexpr, BLOCK_T: tl.constexpr,
                        BLOCK_D: tl.constexpr):
    t = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    t_ok = t < T
    n_i = tl.arange(0, NP)
    pre = tl.load(pre_ptr + t[:, None] * N + n_i[None, :], mask=t_ok[:, None] & (n_i < N)[None, :], other=0.0)
    _collapse_tile(pre, x_ptr, stride_xt, out_ptr, t, t_ok, N, D, tl.program_id(1) * BLOCK_D, NP, BLOCK_D)


@triton.jit
def _hc_expand_kernel(post_ptr, comb_ptr, y_ptr, stride_yt, x_ptr, stride_xt, out_ptr, T, N, D,
                      BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    """out[t, n, d] = post[t, n]·y[t, d] + Σ_j comb[t, j, n]·X[t, j, d], j in order 0..N−1.

    One output stream n at a time, re-reading X[t, j] (from L1) for each: a [BLOCK_T, NP, BLOCK_D] tile with
    its int64 addresses took 151–157 registers at T > 1 (tools/kernel_check.py, nano, Triton 3.9); per
    element the operations and their order are unchanged."""
    t = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    t_ok = t < T
    dd = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = dd < D
    td_ok = t_ok[:, None] & d_ok[None, :]
    y = tl.load(y_ptr + t[:, None] * stride_yt + dd[None, :], mask=td_ok, other=0.0).to(tl.float32)
    for n in range(0, N):
        mixed = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)
        for j in range(0, N):
            c_jn = tl.load(comb_ptr + t * (N * N) + j * N + n, mask=t_ok, other=0.0)  # [BLOCK_T]: comb[t, j, n]
            x_j = tl.load(x_ptr + t[:, None] * stride_xt + j * D + dd[None, :], mask=td_ok, other=0.0).to(tl.float32)
            mixed += c_jn[:, None] * x_j
        post = tl.load(post_ptr + t * N + n, mask=t_ok, other=0.0)  # [BLOCK_T]
        out = post[:, None] * y + mixed
        tl.store(out_ptr + t[:, None] * (N * D) + n * D + dd[None, :], out.to(out_ptr.dtype.element_ty), mask=td_ok)


# ----------------------------------------------------------------------------------------------------
# Launchers and registrations.


def _flat_streams(streams: torch.Tensor, name: str = "streams") -> torch.Tensor:
    """[..., N, D] with a contiguous [N, D] block per token → a [T, N, D] view (no copy; raises otherwise)."""
    check_tensor(name, streams, dtypes=FLOAT_DTYPES)
    check(streams.dim() >= 2, f"{name}: expected [..., N, D], got shape {tuple(streams.shape)}")
    n, d = int(streams.shape[-2]), int(streams.shape[-1])
    check((d <= 1 or streams.stride(-1) == 1) and (n <= 1 or streams.stride(-2) == d),
          f"{name}: each token's [N, D] block must be contiguous, got strides {streams.stride()}")
    try:
        return streams.view(-1, n, d)
    except RuntimeError as err:
        raise ValueError(f"{name}: leading dims of strides {streams.stride()} do not flatten without a copy") from err


def _check_params(fn, base, scale, n, d, rows, n_scale):
    check_tensor("fn", fn, shape=(rows, n * d), dtypes=(torch.float32,), device=None, contiguous=True)
    check_tensor("base", base, shape=(rows,), dtypes=(torch.float32,), contiguous=True)
    check_tensor("scale", scale, shape=(n_scale,), dtypes=(torch.float32,), contiguous=True)


def _launch_weights(streams, fn, base, scale, sinkhorn_iters, hc_eps, rms_eps, *, head, write_weights, collapse):
    x = _flat_streams(streams)
    t, n, d = (int(s) for s in x.shape)
    lead = tuple(streams.shape[:-2])
    rows = n if head else (2 + n) * n
    _check_params(fn, base, scale, n, d, rows, 1 if head else 3)
    for name, p in (("fn", fn), ("base", base), ("scale", scale)):
        check(p.device == streams.device, f"{name} on {p.device}, streams on {streams.device}")
    check(head or sinkhorn_iters >= 1, f"sinkhorn_iters must be ≥ 1, got {sinkhorn_iters}")
    dev = streams.device
    pre = torch.empty(lead + (n,), dtype=torch.float32, device=dev)
    post = torch.empty(lead + (n,), dtype=torch.float32, device=dev)
    comb = torch.empty(lead + (n, n), dtype=torch.float32, device=dev)
    out = torch.empty(lead + (d,), dtype=streams.dtype, device=dev)
    np2 = next_pow2(max(n, 4))  # NP² ≥ 16 keeps every tensor dim a power of two ≥ 16 lanes
    launch(_hc_weights_kernel, (cdiv(t, _BLOCK_T),), x, x.stride(0), fn, base, scale, pre, post, comb, out,
           t, n, d, int(sinkhorn_iters), float(hc_eps), float(rms_eps), NP=np2, BLOCK_T=_BLOCK_T,
           BLOCK_K=_block_k(np2), BLOCK_D=_BLOCK_D, HEAD=head, WRITE_WEIGHTS=write_weights, COLLAPSE=collapse)
    return pre, post, comb, out


@register("hc_weights")
def _hc_weights_triton(streams: torch.Tensor, fn: torch.Tensor, base: torch.Tensor, scale: torch.Tensor,
                       sinkhorn_iters: int, hc_eps: float, rms_eps: float
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """streams [..., N, D] (fp32/fp16/bf16, [N, D] contiguous per token), fn [(2+N)·N, N·D], base [(2+N)·N],
    scale [3] fp32 contiguous → pre [..., N], post [..., N], comb [..., N, N] fp32. Meaning: `hc_weights_ref`."""
    pre, post, comb, _ = _launch_weights(streams, fn, base, scale, sinkhorn_iters, hc_eps, rms_eps, head=False,
                                         write_weights=True, collapse=False)
    return pre, post, comb


@register("hc_weights_collapse")
def _hc_weights_collapse_triton(streams: torch.Tensor, fn: torch.Tensor, base: torch.Tensor, scale: torch.Tensor,
                                sinkhorn_iters: int, hc_eps: float, rms_eps: float
                                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """As `_hc_weights_triton`, plus the collapsed block input [..., D] in the streams' dtype."""
    return _launch_weights(streams, fn, base, scale, sinkhorn_iters, hc_eps, rms_eps, head=False,
                           write_weights=True, collapse=True)


@register("hc_head")
def _hc_head_triton(streams: torch.Tensor, hc_fn: torch.Tensor, hc_base: torch.Tensor, hc_scale: torch.Tensor,
                    hc_eps: float, rms_eps: float) -> torch.Tensor:
    """streams [..., N, D], hc_fn [N, N·D], hc_base [N], hc_scale [1] fp32 → [..., D] in the streams' dtype.
    Meaning: `hc_head_ref`."""
    return _launch_weights(streams, hc_fn, hc_base, hc_scale, 1, hc_eps, rms_eps, head=True, write_weights=False,
                           collapse=True)[3]


@register("hc_collapse")
def _hc_collapse_triton(pre: torch.Tensor, streams: torch.Tensor) -> torch.Tensor:
    """pre [..., N] fp32 contiguous, streams [..., N, D] → [..., D] in the streams' dtype.
    Meaning: `hc_collapse_ref`."""
    x = _flat_streams(streams)
    t, n, d = (int(s) for s in x.shape)
    check_tensor("pre", pre, shape=tuple(streams.shape[:-1]), dtypes=(torch.float32,), device=streams.device,
                 contiguous=True)
    out = torch.empty(tuple(streams.shape[:-2]) + (d,), dtype=streams.dtype, device=streams.device)
    launch(_hc_collapse_kernel, (cdiv(t, _BLOCK_T), cdiv(d, _BLOCK_D)), pre, x, x.stride(0), out, t, n, d,
           NP=next_pow2(max(n, 4)), BLOCK_T=_BLOCK_T, BLOCK_D=_BLOCK_D)
    return out


@register("hc_expand")
def _hc_expand_triton(post: torch.Tensor, comb: torch.Tensor, block_out: torch.Tensor,
                      streams: torch.Tensor) -> torch.Tensor:
    """post [..., N], comb [..., N, N] fp32 contiguous; block_out [..., D] (unit last stride, leading dims
    flattenable); streams [..., N, D] → [..., N, D] in the streams' dtype. Meaning: `hc_expand_ref`."""
    x = _flat_streams(streams)
    t, n, d = (int(s) for s in x.shape)
    lead = tuple(streams.shape[:-2])
    dev = streams.device
    check_tensor("post", post, shape=lead + (n,), dtypes=(torch.float32,), device=dev, contiguous=True)
    check_tensor("comb", comb, shape=lead + (n, n), dtypes=(torch.float32,), device=dev, contiguous=True)
    check_tensor("block_out", block_out, shape=lead + (d,), dtypes=FLOAT_DTYPES, device=dev, unit_last=True)
    try:
        y = block_out.view(-1, d)
    except RuntimeError as err:
        raise ValueError(f"block_out: strides {block_out.stride()} do not flatten without a copy") from err
    out = torch.empty(streams.shape, dtype=streams.dtype, device=dev)
    launch(_hc_expand_kernel, (cdiv(t, _BLOCK_T), cdiv(d, _BLOCK_D)), post, comb, y, y.stride(0), x, x.stride(0),
           out, t, n, d, BLOCK_T=_BLOCK_T, BLOCK_D=_BLOCK_D)
    return out


# ----------------------------------------------------------------------------------------------------
# The public ops: kernels "ref" → reference, "triton" → kernel, "auto" → kernel on CUDA inputs.


def hc_weights(streams, fn, base, scale, sinkhorn_iters: int, hc_eps: float, rms_eps: float, *, kernels: str = "auto"):
    """(pre, post, comb) fp32; see `hc_weights_ref`."""
    if use_triton(kernels, streams, fn, base, scale):
        return _hc_weights_triton(streams, fn, base, scale, int(sinkhorn_iters), float(hc_eps), float(rms_eps))
    return hc_weights_ref(streams, fn, base, scale, sinkhorn_iters, hc_eps, rms_eps)


def hc_weights_collapse(streams, fn, base, scale, sinkhorn_iters: int, hc_eps: float, rms_eps: float, *,
                        kernels: str = "auto"):
    """(pre, post, comb, collapsed block input) in one kernel; see `hc_weights_collapse_ref`."""
    if use_triton(kernels, streams, fn, base, scale):
        return _hc_weights_collapse_triton(streams, fn, base, scale, int(sinkhorn_iters), float(hc_eps),
                                           float(rms_eps))
    return hc_weights_collapse_ref(streams, fn, base, scale, sinkhorn_iters, hc_eps, rms_eps)


def hc_collapse(pre, streams, *, kernels: str = "auto"):
    """Σ_n pre[n]·X[n] → [..., D]; see `hc_collapse_ref`."""
    if use_triton(kernels, pre, streams):
        return _hc_collapse_triton(pre, streams)
    return hc_collapse_ref(pre, streams)


def hc_expand(post, comb, block_out, streams, *, kernels: str = "auto"):
    """post·y + combᵀ·X → [..., N, D]; see `hc_expand_ref`."""
    if use_triton(kernels, post, comb, block_out, streams):
        return _hc_expand_triton(post, comb, block_out, streams)
    return hc_expand_ref(post, comb, block_out, streams)


def hc_head(streams, hc_fn, hc_base, hc_scale, hc_eps: float, rms_eps: float, *, kernels: str = "auto"):
    """Final stream collapse → [..., D]; see `hc_head_ref`."""
    if use_triton(kernels, streams, hc_fn, hc_base, hc_scale):
        return _hc_head_triton(streams, hc_fn, hc_base, hc_scale, float(hc_eps), float(rms_eps))
    return hc_head_ref(streams, hc_fn, hc_base, hc_scale, hc_eps, rms_eps)
