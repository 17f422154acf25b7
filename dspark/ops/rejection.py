"""Chain speculative sampling over a flat ragged verify batch (lossless acceptance).

Layouts: R requests, γ draft slots, V vocabulary, T verify rows (flat, ragged, padded).

    target_logits [T, V] fp32   verify rows; request r's rows sit at start[r] + j, j = 0..ℓ_r
                                (row j: the target's distribution for the token after draft j)
    start [R], verify_len [R]   ℓ_r ∈ [0, γ] drafts verified (ℓ_r = 0: a plain target step)
    draft_logits [R, γ, V]      the draft's corrected logits; its tokens were sampled from
    draft_tokens [R, γ]         probs(draft_logits, same temperature / top-k / top-p)
    temperature [R], top_k [R], top_p [R]       per-request sampling parameters (any may be None:
                                                greedy / off for every request, see ops/sampling.py)
    stop_tokens [R, S] int64    stop token ids, padded with −1
    accept_u [R, γ], sample_u [R]               the randomness, explicit

Outputs (fixed shape):
    accepted [R]        a_r, drafts accepted (≤ ℓ_r)
    emitted [R, γ+1]    accepted drafts then the correction / bonus token, padded with −1
    num_emitted [R]     a_r + 1, or a_r when an accepted draft is a stop token (no bonus then)
    stopped [R]         an emitted token is a stop token

Rule (dspark.md §5.3): accept draft j iff u_j < min(1, p_t(x_j) / max(q(x_j), 1e-8)), a = length of
the accepted prefix; if a < ℓ, the next token is drawn from normalise(max(p_t − q, 0)) at row a (from
p_t if that residual has mass ≤ 1e-8), else the bonus from p_t at row ℓ. Greedy (temperature 0)
is the exact limit: both rows are one-hot, so a draft is accepted iff it is the target argmax.

Exactness: p_t and q are `probs_ref` rows (bit-reproducible, see ops/sampling.py), the ratio is one
IEEE fp32 division, and the residual's mass is measured exactly in 2^-60 fixed point (Σ ⌊r·2^60⌋
against ⌊fp32(1e-8)·2^60⌋; a float sum would depend on its reduction order). The residual / bonus
token is `sample_ref` of that fp32 row. So the kernel's outputs equal the reference's exactly.

Kernels: `_rejection_stats_kernel` (one program per (request, row), target rows j ≤ ℓ and draft rows
j < ℓ) writes each row's filter statistics (max, log2(e)/t, threshold key, 1/Σ kept weights, argmax)
to small [R, 2γ+1] side tensors; `_chain_rejection_kernel` (one program per request) gathers p_t and
q at the drafts from the logits, applies the rule and the stop rule, and draws the residual / bonus
token in three passes over row a (mass and max, total, inverse CDF), each over the tiles of one body,
`_residual_tile`. No [R, γ, V] probabilities are ever written.
"""

from __future__ import annotations

import torch

from dspark.ops._launch import (FLOAT_DTYPES, INDEX_DTYPES, check, check_tensor, launch, next_pow2, register, tl,
                                triton, use_triton)
from dspark.ops._select import NCAND
from dspark.ops.sampling import (fixed_bits, params_or_off, pow2_scale_tl, probs_ref, probs_tl, row_stats, sample_ref,
                                 vocab_block)

_RESIDUAL_BITS = 60
# ⌊fp32(1e-8) · 2^60⌋: "the residual has mass > 1e-8", in exact fixed point.
_RESIDUAL_MIN = int(float(torch.tensor(1e-8, dtype=torch.float32)) * 2 ** _RESIDUAL_BITS)


def residual_has_mass(residual: torch.Tensor) -> torch.Tensor:
    """Σ ⌊r · 2^60⌋ > ⌊fp32(1e-8) · 2^60⌋ per row (r ∈ [0, 1] fp32; exact, order-free) → [R] bool."""
    return (residual.double() * float(2 ** _RESIDUAL_BITS)).long().sum(-1) > _RESIDUAL_MIN


def chain_rejection_ref(target_logits, start, verify_len, draft_logits, draft_tokens, temperature, top_k, top_p,
                        stop_tokens, accept_u, sample_u):
    r, gamma, v = draft_logits.shape
    j = torch.arange(gamma + 1, device=target_logits.device)
    rows = (start.unsqueeze(-1) + j.clamp(max=verify_len.unsqueeze(-1))).clamp(0, target_logits.shape[0] - 1)

    def params(n):  # per-request parameters repeated for n rows each (None: off for every row)
        return tuple(None if t is None else t.repeat_interleave(n) for t in (temperature, top_k, top_p))

    p_t = probs_ref(target_logits[rows].reshape(-1, v), *params(gamma + 1)).view(r, gamma + 1, v)
    q = probs_ref(draft_logits.reshape(-1, v), *params(gamma)).view(r, gamma, v)
    q = torch.cat([q, q.new_zeros(r, 1, v)], dim=1)  # row γ: nothing left to reject
    x = draft_tokens.clamp(min=0).unsqueeze(-1)
    p_x, q_x = p_t[:, :gamma].gather(-1, x).squeeze(-1), q[:, :gamma].gather(-1, x).squeeze(-1)  # [R, γ]
    ok = (accept_u < torch.clamp(p_x / q_x.clamp(min=1e-8), max=1.0)) & (j[:gamma] < verify_len.unsqueeze(-1))
    accepted = ok.long().cumprod(-1).sum(-1)  # [R]

    # A stop token among the accepted drafts ends the request there, without a bonus.
    is_stop = (draft_tokens.unsqueeze(-1) == stop_tokens.unsqueeze(1)).any(-1)  # [R, γ]
    stop_in_prefix = is_stop & (j[:gamma] < accepted.unsqueeze(-1))
    draft_stop = stop_in_prefix.any(-1)
    first_stop = (~stop_in_prefix).long().cumprod(-1).sum(-1)  # drafts before the first stop
    accepted = torch.where(draft_stop, first_stop + 1, accepted)

    # Next token: from the residual at row a when a draft was rejected, else the bonus at row ℓ.
    pick = accepted.view(r, 1, 1).expand(r, 1, v)
    p_a, q_a = p_t.gather(1, pick).squeeze(1), q.gather(1, pick).squeeze(1)  # [R, V]
    residual = (p_a - q_a).clamp(min=0)
    use_residual = (accepted < verify_len) & residual_has_mass(residual)
    nxt = sample_ref(torch.where(use_residual.unsqueeze(-1), residual, p_a), sample_u)
    nxt = torch.where(draft_stop, -1, nxt)

    emitted = torch.full((r, gamma + 1), -1, dtype=torch.long, device=draft_tokens.device)
    emitted[:, :gamma] = torch.where(j[:gamma] < accepted.unsqueeze(-1), draft_tokens, -1)
    emitted.scatter_(1, accepted.unsqueeze(-1), nxt.unsqueeze(-1))
    num_emitted = torch.where(draft_stop, accepted, accepted + 1)
    nxt_stop = (nxt.unsqueeze(-1) == stop_tokens).any(-1) & (nxt >= 0)
    return accepted, emitted, num_emitted, draft_stop | nxt_stop


# ----------------------------------------------------------------------------------------------------
# Triton kernels.


@triton.jit
def _load_stats(m_ptr, c_ptr, thr_ptr, inv_ptr, arg_ptr, slot, mask):
    """The row statistics stored at `slot` (0 where masked) → (m, c, thr, inv, arg), as `probs_tl` takes them."""
    return (tl.load(m_ptr + slot, mask=mask, other=0.0), tl.load(c_ptr + slot, mask=mask, other=0.0),
            tl.load(thr_ptr + slot, mask=mask, other=0), tl.load(inv_ptr + slot, mask=mask, other=0.0),
            tl.load(arg_ptr + slot, mask=mask, other=0))


@triton.jit
def _probs_at(x, tok, m_ptr, c_ptr, thr_ptr, inv_ptr, arg_ptr, slot, mask, greedy, F: tl.constexpr):
    """`probs_tl` of logits x at tokens tok, with the row statistics stored at `slot`."""
    m, c, thr, inv, arg = _load_stats(m_ptr, c_ptr, thr_ptr, inv_ptr, arg_ptr, slot, mask)
    return probs_tl(x, tok, m, c, thr, inv, arg, greedy, F)


@triton.jit
def _residual_tile(t_row, d_row, offs, V, v_q, use_q, m_t, c_t, thr_t, inv_t, arg_t, m_d, c_d, thr_d, inv_d, arg_d,
                   greedy, F: tl.constexpr):
    """Row a at tokens offs → (p, res): p_t (0 past V) and the residual max(p_t − q, 0) (0 unless use_q; the
    draft row is read only below v_q = V if use_q else 0)."""
    inside = offs < V
    p = probs_tl(tl.load(t_row + offs, mask=inside, other=0.0).to(tl.float32), offs, m_t, c_t, thr_t, inv_t, arg_t,
                 greedy, F)
    q = probs_tl(tl.load(d_row + offs, mask=offs < v_q, other=0.0).to(tl.float32), offs, m_d, c_d, thr_d, inv_d,
                 arg_d, greedy, F)
    p = tl.where(inside, p, 0.0)
    res = tl.where(use_q, tl.maximum(p - tl.where(inside, q, 0.0), 0.0), 0.0)
    return p, res


@triton.jit
def _rejection_stats_kernel(logits_ptr, stride_a, stride_b, start_ptr, stride_start, verify_len_ptr, stride_len,
                            temperature_ptr, stride_t, top_k_ptr, stride_k, top_p_ptr, stride_p,
                            m_ptr, c_ptr, thr_ptr, inv_ptr, arg_ptr, T, V, GAMMA: tl.constexpr, F: tl.constexpr,
                            BLOCK_V: tl.constexpr, NCAND: tl.constexpr, IS_DRAFT: tl.constexpr):
    """Program (r, j): statistics of target row j ≤ ℓ_r (slot j) or draft row j < ℓ_r (slot γ+1+j) of
    request r into the [R, 2γ+1] side tensors. Rows no later step reads are skipped."""
    r = tl.program_id(0).to(tl.int64)
    j = tl.program_id(1)
    ell = tl.load(verify_len_ptr + r * stride_len)
    if IS_DRAFT:
        active = j < ell
        row_ptr = logits_ptr + r * stride_a + j * stride_b
        slot = r * (2 * GAMMA + 1) + GAMMA + 1 + j
    else:
        active = j <= ell
        row = tl.minimum(tl.maximum(tl.load(start_ptr + r * stride_start) + j, 0), T - 1)
        row_ptr = logits_ptr + row.to(tl.int64) * stride_a
        slot = r * (2 * GAMMA + 1) + j
    if active:
        t = tl.load(temperature_ptr + r * stride_t)
        k = tl.load(top_k_ptr + r * stride_k).to(tl.int64)
        top_p = tl.load(top_p_ptr + r * stride_p)
        m, c, thr, inv, arg = row_stats(row_ptr, V, t, k, top_p, F, BLOCK_V, NCAND)
        tl.store(m_ptr + slot, m)
        tl.store(c_ptr + slot, c)
        tl.store(thr_ptr + slot, thr)
        tl.store(inv_ptr + slot, inv)
        tl.store(arg_ptr + slot, arg)


@triton.jit
def _chain_rejection_kernel(target_ptr, stride_tv, draft_ptr, stride_dr, stride_dj,
                            start_ptr, stride_start, verify_len_ptr, stride_len, tokens_ptr, stride_xr, stride_xj,
                            temperature_ptr, stride_t, stop_ptr, stride_sr, stride_ss,
                            accept_u_ptr, stride_ur, stride_uj, sample_u_ptr, stride_su,
                            m_ptr, c_ptr, thr_ptr, inv_ptr, arg_ptr,
                            accepted_ptr, emitted_ptr, num_emitted_ptr, stopped_ptr,
                            T, V, S, GAMMA: tl.constexpr, GP: tl.constexpr, SP: tl.constexpr, F: tl.constexpr,
                            BLOCK_V: tl.constexpr, RESIDUAL_MIN: tl.constexpr):
    r = tl.program_id(0).to(tl.int64)
    start = tl.load(start_ptr + r * stride_start)
    ell = tl.load(verify_len_ptr + r * stride_len)
    greedy = tl.load(temperature_ptr + r * stride_t) <= 0.0
    base = r * (2 * GAMMA + 1)

    # Acceptance of drafts j < ℓ, vectorised over the γ slots (GP ≥ γ+1 lanes).
    j = tl.arange(0, GP)
    is_draft = j < GAMMA
    act = is_draft & (j < ell)
    tok = tl.load(tokens_ptr + r * stride_xr + j * stride_xj, mask=is_draft, other=-1).to(tl.int64)
    x = tl.minimum(tl.maximum(tok, 0), V - 1)
    row_t = tl.minimum(tl.maximum(start + j, 0), T - 1).to(tl.int64)
    lt = tl.load(target_ptr + row_t * stride_tv + x, mask=act, other=0.0).to(tl.float32)
    ld = tl.load(draft_ptr + r * stride_dr + j * stride_dj + x, mask=act, other=0.0).to(tl.float32)
    p_x = _probs_at(lt, x, m_ptr, c_ptr, thr_ptr, inv_ptr, arg_ptr, base + j, act, greedy, F)
    q_x = _probs_at(ld, x, m_ptr, c_ptr, thr_ptr, inv_ptr, arg_ptr, base + GAMMA + 1 + j, act, greedy, F)
    ratio = tl.math.div_rn(p_x, tl.maximum(q_x, 1e-8))
    u = tl.load(accept_u_ptr + r * stride_ur + j * stride_uj, mask=is_draft, other=1.0)
    ok = act & (u < tl.minimum(ratio, 1.0, propagate_nan=tl.PropagateNan.ALL))
    accepted = tl.min(tl.where(ok, GP, j), axis=0)  # first rejected (or inactive) slot

    # A stop token among the accepted drafts ends the request after it, without a bonus.
    s_lane = tl.arange(0, SP)
    stops = tl.load(stop_ptr + r * stride_sr + s_lane * stride_ss, mask=s_lane < S, other=-1).to(tl.int64)
    is_stop = tl.max(((tok[:, None] == stops[None, :]) & (s_lane < S)[None, :]).to(tl.int32), axis=1) > 0
    in_prefix = is_draft & is_stop & (j < accepted)
    draft_stop = tl.max(in_prefix.to(tl.int32), axis=0) > 0
    accepted = tl.where(draft_stop, tl.min(tl.where(in_prefix, j, GP), axis=0) + 1, accepted)

    nxt = tl.full([], -1, tl.int64)
    if not draft_stop:
        # Row a: the residual max(p_t − q, 0) when a draft was rejected (a < ℓ) and it has mass, else p_t.
        use_q = accepted < ell
        # accepted ≤ ℓ: target row a always has statistics, draft row a only when a < ℓ.
        m_t, c_t, thr_t, inv_t, arg_t = _load_stats(m_ptr, c_ptr, thr_ptr, inv_ptr, arg_ptr, base + accepted,
                                                    accepted <= ell)
        m_d, c_d, thr_d, inv_d, arg_d = _load_stats(m_ptr, c_ptr, thr_ptr, inv_ptr, arg_ptr,
                                                    base + GAMMA + 1 + accepted, use_q)
        t_row = target_ptr + tl.minimum(tl.maximum(start + accepted, 0), T - 1).to(tl.int64) * stride_tv
        d_row = draft_ptr + r * stride_dr + accepted.to(tl.int64) * stride_dj
        lanes = tl.arange(0, BLOCK_V)
        # NOTE: `vector & scalar-bool` gives an int tensor in the Triton interpreter; mask by a bound instead.
        v_q = tl.where(use_q, V, 0)

        # Pass 1: the residual's fixed-point mass, both rows' maxima and last positive tokens.
        mass_v = tl.zeros([BLOCK_V], dtype=tl.int64)
        rmax_v = tl.zeros([BLOCK_V], dtype=tl.float32)
        pmax_v = tl.zeros([BLOCK_V], dtype=tl.float32)
        rlast_v = tl.full([BLOCK_V], -1, tl.int32)
        plast_v = tl.full([BLOCK_V], -1, tl.int32)
        for s0 in range(0, V, BLOCK_V):
            offs = s0 + lanes
            p, res = _residual_tile(t_row, d_row, offs, V, v_q, use_q, m_t, c_t, thr_t, inv_t, arg_t, m_d, c_d, thr_d,
                                    inv_d, arg_d, greedy, F)
            mass_v += (res.to(tl.float64) * 1152921504606846976.0).to(tl.int64)  # · 2^60
            rmax_v = tl.maximum(rmax_v, res)
            pmax_v = tl.maximum(pmax_v, p)
            rlast_v = tl.maximum(rlast_v, tl.where(res > 0.0, offs, -1))
            plast_v = tl.maximum(plast_v, tl.where(p > 0.0, offs, -1))
        use_res = use_q & (tl.sum(mass_v, axis=0) > RESIDUAL_MIN)
        scale = pow2_scale_tl(tl.where(use_res, tl.max(rmax_v, axis=0), tl.max(pmax_v, axis=0)), F)
        last = tl.where(use_res, tl.max(rlast_v, axis=0), tl.max(plast_v, axis=0))

        # Passes 2 and 3: the integer total, then the first prefix sum above u·total (`sample_ref`).
        total_v = tl.zeros([BLOCK_V], dtype=tl.int64)
        for s0 in range(0, V, BLOCK_V):
            offs = s0 + lanes
            inside = offs < V
            p, res = _residual_tile(t_row, d_row, offs, V, v_q, use_q, m_t, c_t, thr_t, inv_t, arg_t, m_d, c_d, thr_d,
                                    inv_d, arg_d, greedy, F)
            dist = tl.where(use_res, res, p)  # use_res implies use_q
            total_v += tl.where(inside, (dist.to(tl.float64) * scale).to(tl.int64), 0)
        theta = tl.load(sample_u_ptr + r * stride_su).to(tl.float64) * tl.sum(total_v, axis=0).to(tl.float64)
        carry = tl.zeros([], dtype=tl.int64)
        found = tl.full([], V, tl.int32)
        for s0 in range(0, V, BLOCK_V):
            offs = s0 + lanes
            inside = offs < V
            p, res = _residual_tile(t_row, d_row, offs, V, v_q, use_q, m_t, c_t, thr_t, inv_t, arg_t, m_d, c_d, thr_d,
                                    inv_d, arg_d, greedy, F)
            dist = tl.where(use_res, res, p)  # use_res implies use_q
            w = tl.where(inside, (dist.to(tl.float64) * scale).to(tl.int64), 0)
            cdf = carry + tl.cumsum(w, axis=0)
            found = tl.minimum(found, tl.min(tl.where(inside & (cdf.to(tl.float64) > theta), offs, V), axis=0))
            carry += tl.sum(w, axis=0)
        nxt = tl.where(found < V, found, tl.maximum(last, 0)).to(tl.int64)

    # Outputs: drafts before a, the next token at a (−1 after a draft stop), −1 after.
    out_lane = j <= GAMMA
    emitted = tl.where(j < accepted, tok, -1)
    emitted = tl.where(j == accepted, nxt, emitted)
    tl.store(emitted_ptr + r * (GAMMA + 1) + j, emitted, mask=out_lane)
    tl.store(accepted_ptr + r, accepted.to(tl.int64))
    tl.store(num_emitted_ptr + r, tl.where(draft_stop, accepted, accepted + 1).to(tl.int64))
    nxt_stop = (nxt >= 0) & (tl.max(((stops == nxt) & (s_lane < S)).to(tl.int32), axis=0) > 0)
    tl.store(stopped_ptr + r, draft_stop | nxt_stop)


# ----------------------------------------------------------------------------------------------------
# Launcher and registration.


@register("chain_rejection")
def _chain_rejection_triton(target_logits: torch.Tensor, start: torch.Tensor, verify_len: torch.Tensor,
                            draft_logits: torch.Tensor, draft_tokens: torch.Tensor, temperature: torch.Tensor,
                            top_k: torch.Tensor, top_p: torch.Tensor, stop_tokens: torch.Tensor,
                            accept_u: torch.Tensor, sample_u: torch.Tensor
                            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """target_logits [T, V], draft_logits [R, γ, V] (fp32/fp16/bf16, unit last stride, other strides free);
    start, verify_len [R] int; draft_tokens [R, γ] int; temperature, top_p [R] fp32; top_k [R] int;
    stop_tokens [R, S] int (−1 padded); accept_u [R, γ], sample_u [R] fp32 (any strides)
    → accepted [R] int64, emitted [R, γ+1] int64, num_emitted [R] int64, stopped [R] bool.
    Meaning: `chain_rejection_ref`. Preconditions: 0 ≤ ℓ_r ≤ γ, draft tokens < V."""
    check_tensor("draft_logits", draft_logits, ndim=3, dtypes=FLOAT_DTYPES, unit_last=True)
    r, gamma, v = (int(s) for s in draft_logits.shape)
    dev = draft_logits.device
    check_tensor("target_logits", target_logits, ndim=2, dtypes=FLOAT_DTYPES, unit_last=True, device=dev)
    check(target_logits.shape[1] == v and target_logits.shape[0] >= 1,
          f"target_logits {tuple(target_logits.shape)} vs vocabulary {v}")
    check(1 <= v < 2 ** 23, f"vocabulary size {v} outside [1, 2^23)")
    for name, t in (("start", start), ("verify_len", verify_len), ("top_k", top_k)):
        check_tensor(name, t, shape=(r,), dtypes=INDEX_DTYPES, device=dev)
    for name, t in (("temperature", temperature), ("top_p", top_p), ("sample_u", sample_u)):
        check_tensor(name, t, shape=(r,), dtypes=(torch.float32,), device=dev)
    check_tensor("draft_tokens", draft_tokens, shape=(r, gamma), dtypes=INDEX_DTYPES, device=dev)
    check_tensor("accept_u", accept_u, shape=(r, gamma), dtypes=(torch.float32,), device=dev)
    check_tensor("stop_tokens", stop_tokens, ndim=2, dtypes=INDEX_DTYPES, device=dev)
    check(stop_tokens.shape[0] == r, f"stop_tokens {tuple(stop_tokens.shape)} vs {r} requests")
    n_t, n_stop = int(target_logits.shape[0]), int(stop_tokens.shape[1])

    accepted = torch.empty(r, dtype=torch.long, device=dev)
    emitted = torch.empty(r, gamma + 1, dtype=torch.long, device=dev)
    num_emitted = torch.empty(r, dtype=torch.long, device=dev)
    stopped = torch.empty(r, dtype=torch.bool, device=dev)
    # Row statistics, slot j: target row j, slot γ+1+j: draft row j. [R, 2γ+1] each, ~29 bytes per row.
    slots = (r, 2 * gamma + 1)
    m = torch.empty(slots, dtype=torch.float32, device=dev)
    c = torch.empty(slots, dtype=torch.float32, device=dev)
    thr = torch.empty(slots, dtype=torch.long, device=dev)
    inv = torch.empty(slots, dtype=torch.float64, device=dev)
    arg = torch.empty(slots, dtype=torch.int32, device=dev)

    f, block_v = fixed_bits(v), vocab_block(v)
    common = (start, start.stride(0), verify_len, verify_len.stride(0), temperature, temperature.stride(0),
              top_k, top_k.stride(0), top_p, top_p.stride(0), m, c, thr, inv, arg, n_t, v)
    launch(_rejection_stats_kernel, (r, gamma + 1), target_logits, target_logits.stride(0), 0, *common,
           GAMMA=gamma, F=f, BLOCK_V=block_v, NCAND=NCAND, IS_DRAFT=False)
    launch(_rejection_stats_kernel, (r, gamma), draft_logits, draft_logits.stride(0), draft_logits.stride(1), *common,
           GAMMA=gamma, F=f, BLOCK_V=block_v, NCAND=NCAND, IS_DRAFT=True)
    launch(_chain_rejection_kernel, (r,),
           target_logits, target_logits.stride(0), draft_logits, draft_logits.stride(0), draft_logits.stride(1),
           start, start.stride(0), verify_len, verify_len.stride(0),
           draft_tokens, draft_tokens.stride(0), draft_tokens.stride(1), temperature, temperature.stride(0),
           stop_tokens, stop_tokens.stride(0), stop_tokens.stride(1),
           accept_u, accept_u.stride(0), accept_u.stride(1), sample_u, sample_u.stride(0),
           m, c, thr, inv, arg, accepted, emitted, num_emitted, stopped, n_t, v, n_stop,
           GAMMA=gamma, GP=next_pow2(gamma + 1), SP=next_pow2(n_stop), F=f, BLOCK_V=block_v,
           RESIDUAL_MIN=_RESIDUAL_MIN)
    return accepted, emitted, num_emitted, stopped


def chain_rejection(target_logits, start, verify_len, draft_logits, draft_tokens, temperature, top_k, top_p,
                    stop_tokens, accept_u, sample_u, *, kernels: str = "auto"):
    """(accepted, emitted, num_emitted, stopped); see `chain_rejection_ref`. kernels: "auto" | "triton" | "ref"."""
    args = (target_logits, start, verify_len, draft_logits, draft_tokens, temperature, top_k, top_p, stop_tokens,
            accept_u, sample_u)
    if use_triton(kernels, *(a for a in args if a is not None)):
        return _chain_rejection_triton(*args[:5], *params_or_off(temperature, top_k, top_p, start), *args[8:])
    return chain_rejection_ref(*args)
