"""The sequential heads shared by every draft layout (dspark.md §2–§3): the Markov head, the
confidence head, and the left-to-right block sampler.

A model mixing in `BlockHeads` provides `markov_head` (or None: DFlash), `confidence_head` (or
None) and `confidence_with_markov`; names follow DeepSpec's checkpoints (`markov_head.markov_w1`,
`markov_head.markov_w2`, `markov_head.gate_proj`, `markov_head.joint_proj`, `confidence_head.proj`).
"""

from __future__ import annotations

import torch
from torch import nn

from dspark import ops
from dspark.config import MARKOV_HEAD_TYPES



class MarkovHead(nn.Module):
    """The sequential head (dspark.md §2.1): slot i's bias is W2·x_i, with x_i an r-vector built from
    e_i = W1[prev_i] (vanilla: e_i; gated: σ(gate_proj([h_i ; e_i])) ⊙ e_i; rnn: the output gate o_i)."""

    def __init__(self, vocab_size: int, rank: int, kind: str = "vanilla", hidden_size: int = 0):
        super().__init__()
        if kind not in MARKOV_HEAD_TYPES:
            raise ValueError(f"markov head type {kind!r} not in {MARKOV_HEAD_TYPES}")
        d, r, v = hidden_size, rank, vocab_size
        self.kind, self.rank = kind, r
        self.markov_w1 = nn.Embedding(v, r)
        self.markov_w2 = nn.Linear(r, v, bias=False)
        if self.kind == "gated":
            self.gate_proj = nn.Linear(d + r, r)
        elif self.kind == "rnn":
            self.joint_proj = nn.Linear(2 * r + d, 3 * r)

    def step(self, prev: torch.Tensor, h: torch.Tensor, state: torch.Tensor | None
             ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One slot: prev [...] ids, h [..., d], state [..., r] (rnn; None = zeros) → (x [..., r], new state)."""
        e = self.markov_w1(prev)
        if self.kind == "vanilla":
            return e, state
        if self.kind == "gated":
            return torch.sigmoid(self.gate_proj(torch.cat([h, e], dim=-1))) * e, state
        s = torch.zeros_like(e) if state is None else state
        gate, cand, out = self.joint_proj(torch.cat([s, e, h], dim=-1)).chunk(3, dim=-1)
        g = torch.sigmoid(gate)
        # The bias uses the output gate of z_i, built on s_{i-1} (not on the updated state).
        return torch.tanh(out), g * s + (1 - g) * torch.tanh(cand)

    def block(self, prev: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """Teacher-forced slots: prev [..., γ], h [..., γ, d] → x [..., γ, r] (rnn state carried left to right)."""
        if self.kind != "rnn":
            return self.step(prev, h, None)[0]
        state, xs = None, []
        for i in range(prev.shape[-1]):
            x, state = self.step(prev[..., i], h[..., i, :], state)
            xs.append(x)
        return torch.stack(xs, dim=-2)


class ConfidenceHead(nn.Module):
    """z = proj([h ; W1[prev]]) (dspark.md §3.1); the V4 release's head has no bias (dspark_v4.md §4.4)."""

    def __init__(self, width: int, bias: bool = True):
        super().__init__()
        self.proj = nn.Linear(width, 1, bias=bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """features [..., d (+ r)] → fp32 logits [...]. Features arrive in the head's dtype or fp32
        (the V4 draft feeds its fp32 hidden state); the projection runs in the head's dtype."""
        return self.proj(features.to(self.proj.weight.dtype)).squeeze(-1).float()


class BlockHeads:
    """Markov correction, confidence and block sampling for a draft's block hidden states."""

    markov_head: MarkovHead | None
    confidence_head: ConfidenceHead | None
    confidence_with_markov: bool
    kernels: str = "auto"  # dspark.config.KERNELS; drafts set their config's

    def markov_logits(self, logits: torch.Tensor, prev: torch.Tensor, h: torch.Tensor,
                      state: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One slot: U [R, V] fp32, prev [R] ids, h [R, d], state [R, r] (rnn; None = zeros at slot 0)
        → (Ũ [R, V] fp32, new state; None for vanilla/gated). DFlash: (U, state)."""
        if self.markov_head is None:
            return logits, state
        x, state = self.markov_head.step(prev, h, state)
        return ops.markov_logits(logits, x, self.markov_head.markov_w2.weight, kernels=self.kernels), state

    def markov_sample(self, logits: torch.Tensor, prev: torch.Tensor, h: torch.Tensor, temperature: torch.Tensor,
                      top_k: torch.Tensor | None, top_p: torch.Tensor | None, u: torch.Tensor,
                      state: torch.Tensor | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """One slot of the block sampler in one op: `markov_logits`' arguments plus the sampling parameters
        and u [R] → (Ũ [R, V] fp32, token [R] int64 = sample(probs(Ũ, ...), u), new state)."""
        if self.markov_head is None:
            q = ops.probs(logits, temperature, top_k, top_p, kernels=self.kernels)
            return logits, ops.sample(q, u, kernels=self.kernels), state
        x, state = self.markov_head.step(prev, h, state)
        corrected, token = ops.markov_sample(logits, x, self.markov_head.markov_w2.weight, temperature, top_k, top_p,
                                             u, kernels=self.kernels)
        return corrected, token, state

    def corrected_logits_tf(self, logits: torch.Tensor, prev: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """Teacher-forced block: U [..., γ, V], prev [..., γ] (slot i: the token at p+i), h [..., γ, d]
        → Ũ [..., γ, V] fp32."""
        if self.markov_head is None:
            return logits
        return logits + self.markov_head.markov_w2(self.markov_head.block(prev, h)).float()

    def confidence_logits(self, h: torch.Tensor, prev: torch.Tensor) -> torch.Tensor | None:
        """h [..., d], prev [...] → z [...] fp32 (c = σ(z)); None without a confidence head."""
        if self.confidence_head is None:
            return None
        if self.confidence_with_markov:
            h = torch.cat([h, self.markov_head.markov_w1(prev)], dim=-1)
        return self.confidence_head(h)

    def sample_block(self, logits: torch.Tensor, h: torch.Tensor, anchor: torch.Tensor, temperature: torch.Tensor,
                     top_k: torch.Tensor | None, top_p: torch.Tensor | None, u: torch.Tensor,
                     h_confidence: torch.Tensor | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Draw a block left to right (dspark.md §2.3).

        U [R, γ, V] fp32, h [R, γ, d], anchor [R], temperature / top_k / top_p [R] (any may be None:
        greedy / off for every row), u [R, γ] uniforms
        → (tokens [R, γ], Ũ [R, γ, V] fp32, confidence logits [R, γ] fp32 or None).

        Slot i's Ũ uses prev = the anchor (i = 0) or the token sampled at slot i−1, and its token is
        `ops.sample(ops.probs(Ũ_i, ...), u[:, i])` (one fused `ops.markov_sample` per slot), so
        q_i = probs(Ũ_i) is exactly the distribution the token came from. Temperature 0 is the argmax
        (lowest index on ties).
        Confidence i sees h_i (or `h_confidence`, e.g. V4's pre-norm state) and prev_i, never the token
        of slot i. Without a Markov head the slots are independent and Ũ = U.
        """
        r, g, v = logits.shape
        if self.markov_head is None:
            def rows(t: torch.Tensor | None) -> torch.Tensor | None:  # None: a filter off for every row
                return None if t is None else t.unsqueeze(1).expand(r, g).reshape(r * g)

            q = ops.probs(logits.reshape(r * g, v), rows(temperature), rows(top_k), rows(top_p), kernels=self.kernels)
            tokens = ops.sample(q, u.reshape(r * g), kernels=self.kernels).view(r, g)
            corrected = logits
        else:
            prev, state, rows_out, drawn = anchor, None, [], []
            for i in range(g):
                corrected_i, prev, state = self.markov_sample(logits[:, i], prev, h[:, i], temperature, top_k, top_p,
                                                              u[:, i], state)
                rows_out.append(corrected_i)
                drawn.append(prev)
            tokens, corrected = torch.stack(drawn, dim=1), torch.stack(rows_out, dim=1)
        prevs = torch.cat([anchor.unsqueeze(1), tokens[:, :-1]], dim=1)  # [R, γ]
        return tokens, corrected, self.confidence_logits(h if h_confidence is None else h_confidence, prevs)
