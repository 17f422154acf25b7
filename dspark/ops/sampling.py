"""Sampling distributions and inverse-CDF sampling with explicit uniforms. (Over 500 lines on purpose:
the bit-exact recipe below is shared by the reference and the kernels, which must agree bit for bit.)

Layouts: N rows, V vocabulary.

    logits       [N, V] fp32/fp16/bf16  raw logits (target rows or the draft's corrected logits)
    temperature  [N] fp32         0 = greedy: a one-hot at the argmax (lowest index on ties);
                                  None: greedy for every row, known on the host (the reference then
                                  skips the integer weights, most of a greedy CPU step)
    top_k        [N] int64        0 = off; keeps every token tied with the k-th largest
    top_p        [N] fp32         1 = off; keeps the smallest top set whose mass reaches top_p,
                                  the crossing token and every token tied with it included
                 either may be None: off for every row, known on the host (the reference then
                 skips its full-vocabulary sort, which dominates a CPU decode step)
    probs        [N, V] fp32      the filtered, renormalised distribution
    u            [N] fp32         uniforms in [0, 1) for `sample` / `sample_logits`

Order: temperature, then top-k, then top-p on the top-k-renormalised distribution (HF's warper
order). Both rules are tie-symmetric: token x survives top-k iff fewer than k tokens are strictly
more likely, and top-p iff the mass of tokens strictly more likely than x is below top_p. The same
function shapes target and draft rows, so acceptance, residual and bonus use one distribution.

Determinism (why the reference is written the way it is). Every discrete outcome — the kept set, the
sampled token — must be identical between `probs_ref` / `sample_ref` and the Triton kernels, on CPU
and GPU, near-ties included. Floating-point `exp` and reductions cannot promise that: exp differs by
an ulp between libraries (SLEEF, numpy, CUDA's ex2.approx), fp32 sums depend on the reduction order
(torch's CPU cumsum even accumulates in fp64, its CUDA scan in fp32). So every quantity a decision
reads is computed by one bit-reproducible recipe that the reference and the kernels share:

- "More likely" is the order of the logits themselves (exact comparisons; −0.0 equals +0.0), not of
  rounded fp32 probabilities, where distinct logits can round to one value.
- Token weights are integers: W = ⌊2^z · 2^F⌋ with z = (l − max l) · (log2(e) / t) in fp32 (IEEE
  subtract, multiply, correctly rounded division) and 2^z evaluated in Q30 fixed point with integer
  arithmetic only (`exp2_fixed`, relative error < 5e-9; W of the max token is exactly 2^F).
  F = 53 − bit_length(V) makes every sum of weights exact in int64 and in fp64.
- Masses are integer sums (exact, so their order is irrelevant); the top-p cut compares an integer
  mass with fp64(top_p) · fp64(S), one IEEE product.
- probs = fp32(fp64(W) · (1 / fp64(S))) for kept tokens: the float output is bit-identical too.
- `sample` quantises a probability row to integers relative to its maximum (exact power-of-two
  scaling, ⌊p · 2^(F − e)⌋), takes integer prefix sums and returns the first token whose prefix
  exceeds fp64(u) · fp64(total) — the same rule as an fp32 cumsum, but exact and order-free. Tokens
  whose probability is below 2^-F of the row maximum are treated as massless (never drawn except by
  the fallback); each token's mass is off by < 2^-F of the row maximum (≈ 1.5e-11 at V = 129k, far
  below the 2^-24 grid of the uniforms), so the total variation is < V · 2^-F ≈ 2e-6 at worst.
- Fallback (u·total rounds up to the total, or an all-zero row): the last token with probability > 0
  (token 0 if none).

Preconditions (not checked on device): logits contain no NaN / +inf and every row has a finite
value (a row of −inf gives NaN probabilities, as softmax would); V < 2^23; probs rows handed to
`sample` are non-negative and finite.

Kernels: `_sampling_kernel` is one body for `probs` (FROM_LOGITS, WRITE_PROBS), `sample_logits`
(FROM_LOGITS, SAMPLE) and `sample` (SAMPLE on a probability row); one program per row. Its per-row
body is the @jit function `sample_row`, which ops/markov.py's finish kernel also runs, one program per
row (HAS_MAX: the row max and argmax come from the Markov tile kernel's partials). The row machinery
without a leading underscore (`sample_row`, `row_stats`, `probs_tl`, `pow2_scale_tl`, `vocab_block`,
`check_filter_args`) is shared on purpose with ops/rejection.py and ops/markov.py.
The top-k and top-p thresholds are found without sorting: the NCAND-way search of ops/_select.py over
the order keys of the logits, each pass counting tokens (top-k: `kth_key`) or summing integer weights
(top-p: `_top_p_key`) above NCAND candidate keys; it ends on the exact key of the k-th / crossing token,
ties included. Passes over V per row:
1 (max) + ≤9 (top-k) + 1 + ≤9 (top-p) + 1 + the write / sample passes.
TODO(#7): a radix histogram (8 bits per pass) would cut the search to ≤4 passes each; measure first.
TODO(#7): measure whether the weights are compute-bound on the GPU. Estimate: `_exp2_fixed` is 10 int64
multiply-shift-add steps, ≈ 90 SASS instructions per element (≈ 30 of them half-rate IMADs), ≈ 0.8 cycles
per element per SM, so ≈ 330 G weights/s on an H200 against ≈ 1070 G fp32 logits/s of DRAM bandwidth; a
sampled row computes weights in 3+ passes. If the sampler/rejection cost tables confirm it, candidates:
fewer Horner steps after squaring-based range reduction, or an fp32 polynomial with FMA contraction off
(bit-reproducible, relative error ~1e-7 instead of 5e-9). Tables are not: random gathers serialise in L1.
"""

from __future__ import annotations

import torch

from dspark.ops._launch import (FLOAT_DTYPES, INDEX_DTYPES, check, check_tensor, launch, next_pow2, register,
                                tl, triton, use_triton)
from dspark.ops._select import (NCAND, argmax_lowest, kth_key, order_key, positive_zero, search_candidates,
                                search_narrow)

_LOG2E = 1.4426950216293335  # fp32(log2 e), exactly representable
_C_MAX = 2.0 ** 100  # caps log2(e)/t for tiny temperatures (avoids 0·inf)
_Q = 30  # fraction bits of the fixed-point exponent
# Taylor coefficients of 2^x on [0, 1) in Q30: round(ln2^k / k! · 2^30), k = 0..10 (k = 11 rounds to 0).
_EXP2_COEFFS = (1073741824, 744261118, 257941248, 59597083, 10327387, 1431680, 165394, 16377, 1419, 109, 8)


def fixed_bits(v: int) -> int:
    """F such that V weights of at most 2^F sum below 2^53 (exact in int64 and fp64)."""
    return 53 - int(v).bit_length()


def exp2_fixed(z: torch.Tensor, f: int) -> torch.Tensor:
    """⌊2^z · 2^f⌋ as int64 for fp32 z ≤ 0 (−inf allowed), by integer arithmetic only.

    z is clamped to −64, scaled to Q30 (truncating toward zero), split into an integer part n ≤ 0 and a
    fraction; 2^fraction comes from a Horner evaluation with floor shifts; the result is shifted by n.
    The Triton kernels run the same steps, so the weights agree bit for bit on every device.
    """
    zi = (z.float().clamp(min=-64.0) * float(2 ** _Q)).long()  # [.., V] Q30, in [−2^36, 0]
    n = zi >> _Q  # floor: [−64, 0]
    fr = zi - (n << _Q)  # [0, 2^30)
    acc = torch.full_like(fr, _EXP2_COEFFS[-1])
    for coeff in reversed(_EXP2_COEFFS[:-1]):  # in place: this loop is most of a sampled CPU step
        acc.mul_(fr).bitwise_right_shift_(_Q).add_(coeff)  # acc·fr < 2^31 · 2^30: no overflow
    rs = n.neg_().add_(_Q - f)  # right shift (> 0) or left shift (< 0)
    return torch.where(rs >= 0, acc >> rs.clamp(0, 62), acc << (-rs).clamp(0, 62))


def _weights(logits: torch.Tensor, m: torch.Tensor, c: torch.Tensor, f: int) -> torch.Tensor:
    """Integer token weights W = ⌊2^((l − m)·c) · 2^f⌋ → [N, V] int64 (−inf logits weigh 0)."""
    d = torch.where(logits > -torch.inf, logits - m, -torch.inf)
    return exp2_fixed(d * c, f)


def _pow2_scale(pmax: torch.Tensor, f: int) -> torch.Tensor:
    """2^(f − e) in fp64 where 2^(e−1) ≤ pmax < 2^e, read from the exponent bits (subnormals: e = −125)."""
    exponent = (pmax.float().contiguous().view(torch.int32) >> 23) & 0xFF
    k = f + 126 - exponent.clamp(min=1)
    return ((k.long() + 1023) << 52).view(torch.float64)


def quantize_probs(probs: torch.Tensor, f: int) -> torch.Tensor:
    """⌊p · 2^(f − e)⌋ per row → int64, each ≤ 2^f (2^e bounds the row max): sums exact for V < 2^(53−f)."""
    p = probs.float()
    scale = _pow2_scale(p.max(-1, keepdim=True).values, f)
    return (p.double() * scale).long()


def _onehot_argmax(logits: torch.Tensor) -> torch.Tensor:
    # scatter, not F.one_hot: one_hot validates its input on the host (a sync).
    return torch.zeros_like(logits, dtype=torch.float32).scatter_(-1, logits.argmax(-1, keepdim=True), 1.0)


def probs_ref(logits: torch.Tensor, temperature: torch.Tensor | None, top_k: torch.Tensor | None,
              top_p: torch.Tensor | None) -> torch.Tensor:
    logits = logits.float()
    if temperature is None:  # every row greedy (filters keep the argmax, so they change nothing)
        return _onehot_argmax(logits)
    v = logits.shape[-1]
    f = fixed_bits(v)
    greedy = temperature <= 0
    t = torch.where(greedy, 1.0, temperature.float())
    c = (torch.full_like(t, _LOG2E) / t).clamp(max=_C_MAX)  # [N] log2(e)/t, IEEE division
    m = logits.max(-1, keepdim=True).values  # [N, 1]
    w = _weights(logits, m, c.unsqueeze(-1), f)  # [N, V] int64, W(max) = 2^F

    keep = logits > -torch.inf  # off filters keep every token; −inf ones weigh 0 either way
    if top_k is not None or top_p is not None:
        sorted_l, order = logits.sort(dim=-1, descending=True, stable=True)
    if top_k is not None:  # keep l ≥ the k-th largest logit (its ties too)
        k = torch.where(top_k > 0, top_k.clamp(max=v), v) - 1
        keep = logits >= sorted_l.gather(-1, k.unsqueeze(-1))
        w = torch.where(keep, w, 0)
    if top_p is not None:
        # The crossing token c is the first (in logit order) whose inclusive mass reaches top_p·S;
        # keep l ≥ l_c. Integer prefix sums are exact; top_p·S is one fp64 product.
        cum = w.gather(-1, order).cumsum(-1)  # [N, V] int64
        reached = cum.double() >= (top_p.float().double() * cum[:, -1].double()).unsqueeze(-1)
        cross = torch.where(reached.any(-1) & (top_p < 1), reached.long().argmax(-1), v - 1)
        keep = keep & (logits >= sorted_l.gather(-1, cross.unsqueeze(-1)))
        w = torch.where(keep, w, 0)

    inv = 1.0 / w.sum(-1, keepdim=True).double()  # [N, 1] fp64
    p = torch.where(keep, (w.double() * inv).float(), 0.0)
    return torch.where(greedy.unsqueeze(-1), _onehot_argmax(logits), p)


def sample_ref(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF sampling: the first token whose cumulative mass exceeds u·total → [N] int64.

    With u on a stratified grid the induced distribution is exactly `probs` up to grid resolution;
    a token of zero probability is never returned. Masses are the integers of `quantize_probs`.
    """
    w = quantize_probs(probs, fixed_bits(probs.shape[-1]))
    cdf = w.cumsum(-1)  # exact
    target = u.float().double().unsqueeze(-1) * cdf[..., -1:].double()
    hit = cdf.double() > target
    idx = hit.long().argmax(-1)
    # u·total can reach the total (u = 1, or an all-zero row): fall back to the last token with mass.
    last = (probs > 0).long().cumsum(-1).argmax(-1)
    return torch.where(hit.any(-1), idx, last)


def sample_logits_ref(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                      u: torch.Tensor) -> torch.Tensor:
    """`sample_ref(probs_ref(...), u)`: the fused kernel never writes the [N, V] probabilities."""
    return sample_ref(probs_ref(logits, temperature, top_k, top_p), u)


def argmax_ref(logits: torch.Tensor) -> torch.Tensor:
    """Greedy token, lowest index among ties (torch.argmax returns the first maximum)."""
    return logits.argmax(-1)


# ----------------------------------------------------------------------------------------------------
# Triton: the row machinery (names without an underscore are shared with ops/rejection.py and
# ops/markov.py), then the kernel. Logits are read through `positive_zero` and compared by `order_key`
# (ops/_select.py); NaN logits are outside the preconditions.


@triton.jit
def _exp2_fixed(z, F: tl.constexpr):
    """`exp2_fixed` step for step (Q30 Horner with floor shifts; coefficients = _EXP2_COEFFS)."""
    zi = (tl.maximum(z, -64.0) * 1073741824.0).to(tl.int64)
    n = zi >> 30
    fr = zi - (n << 30)
    acc = 109 + ((fr * 8) >> 30)
    acc = 1419 + ((acc * fr) >> 30)
    acc = 16377 + ((acc * fr) >> 30)
    acc = 165394 + ((acc * fr) >> 30)
    acc = 1431680 + ((acc * fr) >> 30)
    acc = 10327387 + ((acc * fr) >> 30)
    acc = 59597083 + ((acc * fr) >> 30)
    acc = 257941248 + ((acc * fr) >> 30)
    acc = 744261118 + ((acc * fr) >> 30)
    acc = 1073741824 + ((acc * fr) >> 30)
    rs = 30 - F - n
    return tl.where(rs >= 0, acc >> tl.minimum(tl.maximum(rs, 0), 62), acc << tl.minimum(tl.maximum(-rs, 0), 62))


@triton.jit
def _weights_tl(x, m, c, F: tl.constexpr):
    """Integer weights of canonical fp32 logits x given the row max m and c = log2(e)/t."""
    d = tl.where(x > -float("inf"), x - m, -float("inf"))
    return _exp2_fixed(d * c, F)


@triton.jit
def probs_tl(x, tok, m, c, thr, inv, arg, greedy, F: tl.constexpr):
    """Filtered probabilities of raw logits x at token ids tok, given the row's statistics."""
    x = positive_zero(x)
    key = order_key(x)
    p = tl.where(key >= thr, (_weights_tl(x, m, c, F).to(tl.float64) * inv).to(tl.float32), 0.0)
    return tl.where(greedy, tl.where(tok == arg, 1.0, 0.0), p)


@triton.jit
def pow2_scale_tl(pmax, F: tl.constexpr):
    """`_pow2_scale`: 2^(F − e) in fp64 from the exponent bits of pmax ≥ 0."""
    exponent = (pmax.to(tl.int32, bitcast=True) >> 23) & 0xFF
    k = F + 126 - tl.maximum(exponent, 1)
    return ((k + 1023).to(tl.int64) << 52).to(tl.float64, bitcast=True)


@triton.jit
def _top_p_key(row_ptr, V, m, c, ps, kth, lo, hi, F: tl.constexpr, BLOCK_V: tl.constexpr, NCAND: tl.constexpr):
    """The crossing token's key: the smallest κ in (lo, hi] with Σ W over kept tokens (key ≥ kth) with key > κ
    below ps, or κ = hi (lo fails, hi holds). The search of ops/_select.py, summing weights per candidate."""
    while hi - lo > 1:
        cand = search_candidates(lo, hi, NCAND)
        acc = tl.zeros([NCAND], dtype=tl.int64)
        for start in range(0, V, BLOCK_V):
            offs = start + tl.arange(0, BLOCK_V)
            inside = offs < V
            x = positive_zero(tl.load(row_ptr + offs, mask=inside, other=0.0).to(tl.float32))
            key = order_key(x)
            w = tl.where(inside & (key >= kth), _weights_tl(x, m, c, F), 0)
            acc += tl.sum(tl.where(key[:, None] > cand[None, :], w[:, None], 0), axis=0)
        lo, hi = search_narrow(lo, hi, cand, (acc.to(tl.float64) < ps) | (cand >= hi))
    return hi


@triton.jit
def _kept_mass(row_ptr, V, m, c, thr, F: tl.constexpr, BLOCK_V: tl.constexpr):
    """Σ W over tokens with key ≥ thr → int64 (exact)."""
    acc = tl.zeros([BLOCK_V], dtype=tl.int64)
    for start in range(0, V, BLOCK_V):
        offs = start + tl.arange(0, BLOCK_V)
        inside = offs < V
        x = positive_zero(tl.load(row_ptr + offs, mask=inside, other=0.0).to(tl.float32))
        acc += tl.where(inside & (order_key(x) >= thr), _weights_tl(x, m, c, F), 0)
    return tl.sum(acc, axis=0)


@triton.jit
def _row_max(row_ptr, V, BLOCK_V: tl.constexpr):
    """One pass → (m, arg): the row's max logit (−0.0 read as +0.0) and its lowest index."""
    best = tl.full([BLOCK_V], -float("inf"), tl.float32)
    best_i = tl.zeros([BLOCK_V], dtype=tl.int32)
    for start in range(0, V, BLOCK_V):
        offs = start + tl.arange(0, BLOCK_V)
        x = positive_zero(tl.load(row_ptr + offs, mask=offs < V, other=-float("inf")).to(tl.float32))
        better = x > best  # strict: the earliest index of a lane's maximum stays
        best = tl.where(better, x, best)
        best_i = tl.where(better, offs, best_i)
    return argmax_lowest(best, best_i, V, 0)


@triton.jit
def _row_filter(row_ptr, V, m, t, k, top_p, F: tl.constexpr, BLOCK_V: tl.constexpr, NCAND: tl.constexpr):
    """Given the row max m → (c, thr, inv): log2(e)/t, the threshold key (keep key ≥ thr) and 1 / Σ kept W
    in fp64. Greedy rows (t ≤ 0) skip the searches and the mass passes."""
    m_key = order_key(m)
    greedy = t <= 0.0
    c = tl.minimum(tl.math.div_rn(tl.full([], 1.4426950216293335, tl.float32), tl.where(greedy, 1.0, t)),
                   1.2676506002282294e30)
    thr = tl.full([], -2139095041, tl.int64)  # key(−inf): keep everything
    inv = tl.full([], 1.0, tl.float64)
    if t > 0.0:
        if (k > 0) & (k < V):
            thr, _ = kth_key(row_ptr, V, k, thr - 1, m_key + 1, BLOCK_V, NCAND)  # the k-th largest key
        s = _kept_mass(row_ptr, V, m, c, thr, F, BLOCK_V)
        if top_p < 1.0:
            ps = top_p.to(tl.float64) * s.to(tl.float64)
            thr = _top_p_key(row_ptr, V, m, c, ps, thr, thr - 1, m_key, F, BLOCK_V, NCAND)
            s = _kept_mass(row_ptr, V, m, c, thr, F, BLOCK_V)
        inv = 1.0 / s.to(tl.float64)
    return c, thr, inv


@triton.jit
def row_stats(row_ptr, V, t, k, top_p, F: tl.constexpr, BLOCK_V: tl.constexpr, NCAND: tl.constexpr):
    """One row's filter → (m, c, thr, inv, arg): the max logit, log2(e)/t, the threshold key (keep key ≥ thr),
    1 / Σ kept W in fp64, and the lowest argmax (used by greedy rows, t ≤ 0, which skip the rest)."""
    m, arg = _row_max(row_ptr, V, BLOCK_V)
    c, thr, inv = _row_filter(row_ptr, V, m, t, k, top_p, F, BLOCK_V, NCAND)
    return m, c, thr, inv, arg


@triton.jit
def sample_row(row_ptr, V, t, k, top_p, u, m, arg, probs_row_ptr, token_ptr, F: tl.constexpr,
               BLOCK_V: tl.constexpr, NCAND: tl.constexpr, FROM_LOGITS: tl.constexpr, HAS_MAX: tl.constexpr,
               WRITE_PROBS: tl.constexpr, SAMPLE: tl.constexpr):
    """The per-row body shared by `_sampling_kernel` and ops/markov.py's finish kernel. FROM_LOGITS: row_ptr
    holds logits, filtered with (t, k, top_p), then WRITE_PROBS to probs_row_ptr and / or SAMPLE with the
    uniform u into token_ptr; HAS_MAX: m and arg (the row max, −0.0 as +0.0, and its lowest index) come from
    the caller, saving the max pass. Else row_ptr is a probability row to SAMPLE from (t, k, top_p, m, arg
    unused)."""
    lanes = tl.arange(0, BLOCK_V)
    if FROM_LOGITS:
        if not HAS_MAX:
            m, arg = _row_max(row_ptr, V, BLOCK_V)
        c, thr, inv = _row_filter(row_ptr, V, m, t, k, top_p, F, BLOCK_V, NCAND)
        greedy = t <= 0.0
        # W(max token) = 2^F exactly, so the row maximum of probs is known without a pass.
        pmax = tl.where(greedy, 1.0, (inv * (2.0 ** F)).to(tl.float32))
    else:
        pmax_v = tl.zeros([BLOCK_V], dtype=tl.float32)
        for start in range(0, V, BLOCK_V):
            offs = start + lanes
            pmax_v = tl.maximum(pmax_v, tl.load(row_ptr + offs, mask=offs < V, other=0.0).to(tl.float32))
        pmax = tl.max(pmax_v, axis=0)

    if SAMPLE:
        scale = pow2_scale_tl(pmax, F)
        total_v = tl.zeros([BLOCK_V], dtype=tl.int64)
        last_v = tl.full([BLOCK_V], -1, tl.int32)
    for start in range(0, V, BLOCK_V):  # write and / or measure pass
        offs = start + lanes
        inside = offs < V
        if FROM_LOGITS:
            p = probs_tl(tl.load(row_ptr + offs, mask=inside, other=0.0).to(tl.float32), offs, m, c, thr, inv, arg,
                         greedy, F)
        else:
            p = tl.load(row_ptr + offs, mask=inside, other=0.0).to(tl.float32)
        if WRITE_PROBS:
            tl.store(probs_row_ptr + offs, p, mask=inside)
        if SAMPLE:
            total_v += tl.where(inside, (p.to(tl.float64) * scale).to(tl.int64), 0)
            last_v = tl.maximum(last_v, tl.where(inside & (p > 0.0), offs, -1))

    if SAMPLE:
        theta = u.to(tl.float64) * tl.sum(total_v, axis=0).to(tl.float64)
        carry = tl.zeros([], dtype=tl.int64)
        found = tl.full([], V, tl.int32)
        for start in range(0, V, BLOCK_V):  # inverse-CDF pass: first prefix sum > θ
            offs = start + lanes
            inside = offs < V
            if FROM_LOGITS:
                p = probs_tl(tl.load(row_ptr + offs, mask=inside, other=0.0).to(tl.float32), offs, m, c, thr, inv,
                             arg, greedy, F)
            else:
                p = tl.load(row_ptr + offs, mask=inside, other=0.0).to(tl.float32)
            w = tl.where(inside, (p.to(tl.float64) * scale).to(tl.int64), 0)
            cdf = carry + tl.cumsum(w, axis=0)
            found = tl.minimum(found, tl.min(tl.where(inside & (cdf.to(tl.float64) > theta), offs, V), axis=0))
            carry += tl.sum(w, axis=0)
        last = tl.max(last_v, axis=0)
        token = tl.where(found < V, found, tl.maximum(last, 0))
        tl.store(token_ptr, token.to(tl.int64))


@triton.jit
def _sampling_kernel(src_ptr, stride_src, temperature_ptr, stride_t, top_k_ptr, stride_k, top_p_ptr, stride_p,
                     u_ptr, stride_u, probs_ptr, tokens_ptr, V, F: tl.constexpr, BLOCK_V: tl.constexpr,
                     NCAND: tl.constexpr, FROM_LOGITS: tl.constexpr, WRITE_PROBS: tl.constexpr,
                     SAMPLE: tl.constexpr):
    """One row per program (`sample_row`). FROM_LOGITS: src is logits, filter it (and WRITE_PROBS and / or
    SAMPLE); else src is a probability row to SAMPLE from."""
    row = tl.program_id(0).to(tl.int64)
    t = 1.0  # t, k, top_p, u: placeholders for the flags that never read them
    k = 0
    top_p = 1.0
    if FROM_LOGITS:
        t = tl.load(temperature_ptr + row * stride_t)
        k = tl.load(top_k_ptr + row * stride_k).to(tl.int64)
        top_p = tl.load(top_p_ptr + row * stride_p)
    u = 0.0
    if SAMPLE:
        u = tl.load(u_ptr + row * stride_u)
    sample_row(src_ptr + row * stride_src, V, t, k, top_p, u, 0.0, 0, probs_ptr + row * V, tokens_ptr + row, F,
                BLOCK_V, NCAND, FROM_LOGITS, False, WRITE_PROBS, SAMPLE)


# ----------------------------------------------------------------------------------------------------
# Launchers and registrations.


def vocab_block(v: int) -> int:
    # 256 lanes × NCAND=16 int64 candidates per search tile keeps the [BLOCK_V, NCAND] tile at 32 int64
    # registers per thread with 4 warps; untuned (no GPU measurement yet).
    return min(256, next_pow2(v))


def check_filter_args(logits, temperature, top_k, top_p):
    check_tensor("logits", logits, ndim=2, dtypes=FLOAT_DTYPES, unit_last=True)
    n, v = logits.shape
    check(1 <= v < 2 ** 23, f"vocabulary size {v} outside [1, 2^23)")
    dev = logits.device
    check_tensor("temperature", temperature, shape=(n,), dtypes=(torch.float32,), device=dev)
    check_tensor("top_k", top_k, shape=(n,), dtypes=INDEX_DTYPES, device=dev)
    check_tensor("top_p", top_p, shape=(n,), dtypes=(torch.float32,), device=dev)


def _launch_sampling(src, temperature, top_k, top_p, u, probs_out, tokens_out, *, from_logits, write_probs, sample):
    n, v = int(src.shape[0]), int(src.shape[1])
    dummy = tokens_out if tokens_out is not None else probs_out
    launch(_sampling_kernel, (n,),
           src, src.stride(0),
           temperature if temperature is not None else src, temperature.stride(0) if temperature is not None else 0,
           top_k if top_k is not None else src, top_k.stride(0) if top_k is not None else 0,
           top_p if top_p is not None else src, top_p.stride(0) if top_p is not None else 0,
           u if u is not None else src, u.stride(0) if u is not None else 0,
           probs_out if probs_out is not None else dummy, tokens_out if tokens_out is not None else dummy,
           v, F=fixed_bits(v), BLOCK_V=vocab_block(v), NCAND=NCAND,
           FROM_LOGITS=from_logits, WRITE_PROBS=write_probs, SAMPLE=sample)


@register("probs")
def _probs_triton(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor,
                  top_p: torch.Tensor) -> torch.Tensor:
    """logits [N, V] (fp32/fp16/bf16, unit last stride), temperature [N] fp32, top_k [N] int, top_p [N] fp32
    → probs [N, V] fp32. Meaning: `probs_ref`."""
    check_filter_args(logits, temperature, top_k, top_p)
    out = torch.empty(logits.shape, dtype=torch.float32, device=logits.device)
    _launch_sampling(logits, temperature, top_k, top_p, None, out, None, from_logits=True, write_probs=True,
                     sample=False)
    return out


@register("sample_logits")
def _sample_logits_triton(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                          u: torch.Tensor) -> torch.Tensor:
    """As `_probs_triton` plus u [N] fp32 → tokens [N] int64. Meaning: `sample_logits_ref`."""
    check_filter_args(logits, temperature, top_k, top_p)
    check_tensor("u", u, shape=(logits.shape[0],), dtypes=(torch.float32,), device=logits.device)
    out = torch.empty(logits.shape[0], dtype=torch.long, device=logits.device)
    _launch_sampling(logits, temperature, top_k, top_p, u, None, out, from_logits=True, write_probs=False,
                     sample=True)
    return out


@register("sample")
def _sample_triton(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """probs [N, V] (float, unit last stride, non-negative), u [N] fp32 → tokens [N] int64. Meaning: `sample_ref`."""
    check_tensor("probs", probs, ndim=2, dtypes=FLOAT_DTYPES, unit_last=True)
    check(1 <= probs.shape[1] < 2 ** 23, f"vocabulary size {probs.shape[1]} outside [1, 2^23)")
    check_tensor("u", u, shape=(probs.shape[0],), dtypes=(torch.float32,), device=probs.device)
    out = torch.empty(probs.shape[0], dtype=torch.long, device=probs.device)
    _launch_sampling(probs, None, None, None, u, None, out, from_logits=False, write_probs=False, sample=True)
    return out


# ----------------------------------------------------------------------------------------------------
# The public ops: kernels "ref" → reference, "triton" → kernel, "auto" → kernel on CUDA inputs.


def params_or_off(temperature: torch.Tensor | None, top_k: torch.Tensor | None, top_p: torch.Tensor | None,
                  rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Explicit values for parameters passed as None (the kernels take tensors), one per row of `rows`:
    temperature 0 (greedy), top-k and top-p off."""
    n, dev = rows.shape[0], rows.device
    return (torch.zeros(n, dtype=torch.float32, device=dev) if temperature is None else temperature,
            torch.zeros(n, dtype=torch.long, device=dev) if top_k is None else top_k,
            torch.ones(n, dtype=torch.float32, device=dev) if top_p is None else top_p)


def probs(logits: torch.Tensor, temperature: torch.Tensor | None, top_k: torch.Tensor | None,
          top_p: torch.Tensor | None, *, kernels: str = "auto") -> torch.Tensor:
    """Filtered sampling distribution [N, V] fp32; see `probs_ref`."""
    if use_triton(kernels, logits):
        return _probs_triton(logits, *params_or_off(temperature, top_k, top_p, logits))
    return probs_ref(logits, temperature, top_k, top_p)


def sample(probs: torch.Tensor, u: torch.Tensor, *, kernels: str = "auto") -> torch.Tensor:
    """Inverse-CDF token per row [N] int64; see `sample_ref`."""
    if use_triton(kernels, probs, u):
        return _sample_triton(probs, u)
    return sample_ref(probs, u)


def sample_logits(logits: torch.Tensor, temperature: torch.Tensor | None, top_k: torch.Tensor | None,
                  top_p: torch.Tensor | None, u: torch.Tensor, *, kernels: str = "auto") -> torch.Tensor:
    """`sample(probs(...), u)` in one pass set, without writing the probabilities; see `sample_logits_ref`."""
    if use_triton(kernels, logits, u):
        return _sample_logits_triton(logits, *params_or_off(temperature, top_k, top_p, logits), u)
    return sample_logits_ref(logits, temperature, top_k, top_p, u)
