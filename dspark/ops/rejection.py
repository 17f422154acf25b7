"""Chain speculative sampling over a flat ragged verify batch (lossless acceptance).

Layouts: R requests, γ draft slots, V vocabulary, T verify rows (flat, ragged, padded).

    target_logits [T, V] fp32   verify rows; request r's rows sit at start[r] + j, j = 0..ℓ_r
                                (row j: the target's distribution for the token after draft j)
    start [R], verify_len [R]   ℓ_r ∈ [0, γ] drafts verified (ℓ_r = 0: a plain target step)
    draft_logits [R, γ, V]      the draft's corrected logits; its tokens were sampled from
    draft_tokens [R, γ]         probs(draft_logits, same temperature / top-k / top-p)
    temperature [R], top_k [R], top_p [R]       per-request sampling parameters
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
"""

from __future__ import annotations

import torch

from dspark.ops.sampling import probs_ref, sample_ref


def chain_rejection_ref(target_logits, start, verify_len, draft_logits, draft_tokens, temperature, top_k, top_p,
                        stop_tokens, accept_u, sample_u):
    r, gamma, v = draft_logits.shape
    j = torch.arange(gamma + 1, device=target_logits.device)
    rows = (start.unsqueeze(-1) + j.clamp(max=verify_len.unsqueeze(-1))).clamp(0, target_logits.shape[0] - 1)

    def params(n):  # per-request parameters repeated for n rows each
        return temperature.repeat_interleave(n), top_k.repeat_interleave(n), top_p.repeat_interleave(n)

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
    use_residual = (accepted < verify_len) & (residual.sum(-1) > 1e-8)
    nxt = sample_ref(torch.where(use_residual.unsqueeze(-1), residual, p_a), sample_u)
    nxt = torch.where(draft_stop, -1, nxt)

    emitted = torch.full((r, gamma + 1), -1, dtype=torch.long, device=draft_tokens.device)
    emitted[:, :gamma] = torch.where(j[:gamma] < accepted.unsqueeze(-1), draft_tokens, -1)
    emitted.scatter_(1, accepted.unsqueeze(-1), nxt.unsqueeze(-1))
    num_emitted = torch.where(draft_stop, accepted, accepted + 1)
    nxt_stop = (nxt.unsqueeze(-1) == stop_tokens).any(-1) & (nxt >= 0)
    return accepted, emitted, num_emitted, draft_stop | nxt_stop


# TODO(#7): one kernel reading logits (+ log-sum-exp) instead of materialised probabilities.
chain_rejection = chain_rejection_ref
