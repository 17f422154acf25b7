"""DSpark / DFlash block drafters in DeepSpec's `Qwen3DSparkModel` and `Gemma4DSparkModel` layouts
(dspark.md §1–§3).

Vocabulary: R requests (inference rows), B sequences, S context rows, K blocks (anchors) per
sequence, γ block size, d hidden, F context width (taps × target hidden), H / H_kv query and KV
heads, hd head dim, V vocabulary, r Markov rank.

    context    C = hidden_norm(fc(f_t)) once per call; every layer projects the same C with its own
               k_proj (+ k_norm + RoPE at the context position) and v_proj ("KV injection")
    block      γ rows [x_0, MASK × (γ−1)] at positions p..p+γ−1, L Qwen3 pre-norm layers whose
               attention sees [context rows t < p ; all γ block rows], no causal mask; h = norm(X)
    heads      U = lm_head(h); Ũ_i = U_i + W2·x_i with x_i from the previous token (vanilla), gated
               by h_i (gated), or an RNN over the block (rnn); z_i = proj([h_i ; W1[prev_i]])

The Gemma 4 layout is the same model with named deltas (DraftConfig): token embeddings × sqrt(d),
attention scale 1 over keys normed per head, values = the raw keys (k_eq_v, no v_proj) put through a
scale-free RMSNorm, RoPE on a fraction of each head ("proportional"), norms on the attention and MLP
outputs too with a per-layer `layer_scalar`, a tanh-GELU MLP and soft-capped logits.

Slot i predicts the token at p+i+1; its previous token is the one at p+i (slot 0: the anchor).
Inference keeps per-request context K/V (`context_kv`) and runs `block_hidden` on the valid rows;
training (`forward_train`) runs K blocks per sequence under DeepSpec's block mask. A block with
no key to attend to (a training dummy block) gets a zero attention output, never NaN.

NOTE: attention here is the plain-PyTorch reference (scores in the weights' dtype, softmax in
fp32); the fused block-attention kernel of dspark.md §10 replaces it in #7.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from dspark.config import DraftConfig
from dspark.model.layers import RMSNorm
from dspark.draft.heads import BlockHeads, ConfidenceHead, MarkovHead
from dspark.draft.protocol import TrainOutput, block_label_index

def _scale_free_rms_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    """Gemma 4's v_norm: RMSNorm without weight, product in fp32, cast once (`unweighted_rms_norm` multiplies
    in x's dtype, which differs in bf16)."""
    xf = x.float()
    return (xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + eps)).to(x.dtype)


def rotate_half(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Qwen3 (NeoX) rotary embedding in fp32: x [..., T, heads, hd], cos/sin [..., T, hd/2]."""
    half = x.shape[-1] // 2
    xf = x.float()
    x1, x2 = xf[..., :half], xf[..., half:]
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)  # broadcast over heads
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)


class DraftAttention(nn.Module):
    """Queries from the block rows; keys/values from [context rows ; block rows] with shared projections."""

    def __init__(self, config: DraftConfig):
        super().__init__()
        d, hd = config.hidden_size, config.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, hd
        self.scale = hd ** -0.5 if config.attention_scale is None else config.attention_scale
        self.value_norm_eps = config.rms_norm_eps if config.value_norm else None
        self.q_proj = nn.Linear(d, config.num_heads * hd, bias=False)
        self.k_proj = nn.Linear(d, config.num_kv_heads * hd, bias=False)
        self.v_proj = None if config.k_eq_v else nn.Linear(d, config.num_kv_heads * hd, bias=False)
        self.o_proj = nn.Linear(config.num_heads * hd, d, bias=False)
        self.q_norm = RMSNorm(hd, config.rms_norm_eps)
        self.k_norm = RMSNorm(hd, config.rms_norm_eps)

    def context_kv(self, c: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """c [..., T, d] (context rows, or normed block rows) → k, v [..., T, H_kv, hd]; k normed and rotated."""
        k = self.k_proj(c).unflatten(-1, (self.num_kv_heads, self.head_dim))
        v = k if self.v_proj is None else self.v_proj(c).unflatten(-1, (self.num_kv_heads, self.head_dim))
        if self.value_norm_eps is not None:
            v = _scale_free_rms_norm(v, self.value_norm_eps)
        return rotate_half(self.k_norm(k), cos, sin), v

    def forward(self, y: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, ctx_k: torch.Tensor,
                ctx_v: torch.Tensor, ctx_mask: torch.Tensor, blk_valid: torch.Tensor) -> torch.Tensor:
        """y [N, Q, γ, d] normed block rows of Q blocks per item; cos/sin [N, Q, γ, hd/2];
        ctx_k/ctx_v [N, S, H_kv, hd] shared by the item's blocks; ctx_mask [N, Q, S] bool (block may
        see context row); blk_valid [N, Q] bool (block sees its own rows) → [N, Q, γ, d]."""
        n, nq, g, _ = y.shape
        s = ctx_k.shape[1]
        groups = self.num_heads // self.num_kv_heads
        q = self.q_norm(self.q_proj(y).unflatten(-1, (self.num_heads, self.head_dim)))
        q = rotate_half(q, cos, sin).unflatten(-2, (self.num_kv_heads, groups))  # [N, Q, γ, H_kv, G, hd]
        k, v = self.context_kv(y, cos, sin)  # [N, Q, γ, H_kv, hd]

        s_ctx = torch.einsum("nqtkgd,nskd->nqkgts", q, ctx_k)  # [N, Q, H_kv, G, γ, S]
        s_blk = torch.einsum("nqtkgd,nqukd->nqkgtu", q, k)  # [N, Q, H_kv, G, γ, γ]
        scores = torch.cat([s_ctx, s_blk], dim=-1).float() * self.scale
        allowed = torch.cat([ctx_mask, blk_valid.unsqueeze(-1).expand(n, nq, g)], dim=-1)  # [N, Q, S+γ]
        # A finite fill, not -inf: a row with no allowed key (dummy block) gets uniform weights and
        # a zeroed output below, so neither the forward nor the backward pass ever sees NaN.
        scores = scores.masked_fill(~allowed[:, :, None, None, None, :], torch.finfo(torch.float32).min)
        p = scores.softmax(dim=-1).to(v.dtype)
        out = (torch.einsum("nqkgts,nskd->nqtkgd", p[..., :s], ctx_v)
               + torch.einsum("nqkgtu,nqukd->nqtkgd", p[..., s:], v))  # [N, Q, γ, H_kv, G, hd]
        out = torch.where(allowed.any(-1)[:, :, None, None, None, None], out, 0.0)
        return self.o_proj(out.flatten(-3))


class DraftMLP(nn.Module):
    def __init__(self, config: DraftConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.tanh_gelu = config.hidden_act == "gelu_pytorch_tanh"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = self.gate_proj(x)
        gate = F.gelu(gate, approximate="tanh") if self.tanh_gelu else F.silu(gate)
        return self.down_proj(gate * self.up_proj(x))


class DraftLayer(nn.Module):
    """Pre-norm decoder layer over block rows (Qwen3; Gemma 4 adds output norms); the context enters only as K/V.

    NOTE: `post_attention_layernorm` is the MLP's input norm in Qwen3 but the attention output's norm in
    Gemma 4 (whose MLP input norm is `pre_feedforward_layernorm`): the checkpoint names decide.
    """

    def __init__(self, config: DraftConfig):
        super().__init__()
        d, eps = config.hidden_size, config.rms_norm_eps
        self.input_layernorm = RMSNorm(d, eps)
        self.self_attn = DraftAttention(config)
        self.post_attention_layernorm = RMSNorm(d, eps)
        self.mlp = DraftMLP(config)
        self.sandwich_norms = config.sandwich_norms
        if config.sandwich_norms:
            self.pre_feedforward_layernorm = RMSNorm(d, eps)
            self.post_feedforward_layernorm = RMSNorm(d, eps)
            # A checkpoint buffer (1.0 in DeepSpec's drafts, never trained) that scales the layer's output.
            self.register_buffer("layer_scalar", torch.ones(1))

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, ctx_k: torch.Tensor,
                ctx_v: torch.Tensor, ctx_mask: torch.Tensor, blk_valid: torch.Tensor) -> torch.Tensor:
        """x [N, Q, γ, d] residual stream → the stream after the attention and MLP residual adds."""
        attn = self.self_attn(self.input_layernorm(x), cos, sin, ctx_k, ctx_v, ctx_mask, blk_valid)
        if not self.sandwich_norms:
            x = x + attn
            return x + self.mlp(self.post_attention_layernorm(x))
        x = x + self.post_attention_layernorm(attn)
        x = x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))
        return x * self.layer_scalar


class TokenIO:
    """What DeepSpec's draft layouts (DSpark / DFlash and EAGLE-3) compute alike from the config's layout fields
    (rope_theta, rope_fraction, embed_scale, logit_softcap) and the `embed_tokens` / `lm_head` they hold."""

    def rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [...] → cos, sin [..., hd/2] fp32 (HF's default / proportional inv_freq, built on the device):
        the first ⌊rope_fraction·hd/2⌋ pairs rotate at frequencies over hd, the rest get frequency 0."""
        hd = self.config.head_dim
        rotated = int(self.config.rope_fraction * hd // 2)  # HF's int(partial_rotary_factor * head_dim // 2)
        inv_freq = 1.0 / (self.config.rope_theta ** (torch.arange(0, 2 * rotated, 2, device=positions.device,
                                                                  dtype=torch.float32) / hd))
        inv_freq = F.pad(inv_freq, (0, hd // 2 - rotated))
        freqs = positions.float().unsqueeze(-1) * inv_freq
        return freqs.cos(), freqs.sin()

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [...] → token embeddings [..., d] × embed_scale (rounded to the weights' dtype, as Gemma)."""
        x = self.embed_tokens(ids)
        if self.config.embed_scale == 1.0:
            return x
        return x * torch.tensor(self.config.embed_scale, dtype=x.dtype, device=x.device)

    def head_logits(self, h: torch.Tensor) -> torch.Tensor:
        """h [..., d] → U = lm_head(h) [..., V] fp32, soft-capped if the config says so (in the weights' dtype,
        as DeepSpec)."""
        logits = self.lm_head(h)
        cap = self.config.logit_softcap
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        return logits.float()


class DraftModel(TokenIO, BlockHeads, nn.Module):
    """The draft; state_dict names are DeepSpec's checkpoint names (dspark.md §9)."""

    def __init__(self, config: DraftConfig):
        super().__init__()
        self.config, self.kernels = config, config.kernels
        d = config.hidden_size
        self.embed_tokens = nn.Embedding(config.vocab_size, d)
        self.layers = nn.ModuleList(DraftLayer(config) for _ in range(config.num_layers))
        self.norm = RMSNorm(d, config.rms_norm_eps)
        self.fc = nn.Linear(config.context_width, d, bias=False)
        self.hidden_norm = RMSNorm(d, config.rms_norm_eps)
        self.lm_head = nn.Linear(d, config.vocab_size, bias=False)
        self.markov_head = (MarkovHead(config.vocab_size, config.markov_rank, config.markov_head_type, d)
                            if config.has_markov_head else None)
        width = d + (config.markov_rank if config.confidence_with_markov else 0)
        self.confidence_head = ConfidenceHead(width, config.confidence_bias) if config.has_confidence_head else None
        self.confidence_with_markov = config.confidence_with_markov

    # ------------------------------------------------------------------ construction
    @classmethod
    def empty(cls, config: DraftConfig, *, dtype: torch.dtype = torch.float32,
              device: torch.device | str = "cpu") -> "DraftModel":
        """Uninitialised weights allocated once on `device` in `dtype` (built on the meta device)."""
        with torch.device("meta"):
            model = cls(config)
        return model.to(dtype=dtype).to_empty(device=device)

    @classmethod
    def random(cls, config: DraftConfig, *, seed: int = 0, dtype: torch.dtype = torch.float32,
               device: torch.device | str = "cpu") -> "DraftModel":
        """Non-trivial random weights (the fixture's recipe): linear N(0, 1/fan_in), embeddings N(0, 1),
        biases N(0, 0.25²), norm weights U(0.5, 1.5); buffers (`layer_scalar`) 1."""
        model = cls.empty(config, device="cpu")
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("norm.weight"):
                    p.copy_(torch.rand(p.shape, generator=gen) + 0.5)
                elif name.endswith("bias"):
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.25)
                elif isinstance(model.get_submodule(name.rsplit(".", 1)[0]), nn.Embedding):
                    p.copy_(torch.randn(p.shape, generator=gen))
                else:
                    p.copy_(torch.randn(p.shape, generator=gen) * p.shape[-1] ** -0.5)
            for b in model.buffers():
                b.fill_(1.0)
        return model.to(dtype=dtype, device=device)

    @classmethod
    def from_pretrained(cls, path: str | Path, *, dtype: torch.dtype = torch.float32,
                        device: torch.device | str = "cpu", shared_embed: torch.Tensor | None = None,
                        shared_head: torch.Tensor | None = None, kernels: str = "auto") -> "DraftModel":
        """Load a DeepSpec draft checkpoint directory: the README's entry point, a facade over
        `dspark.checkpoint.load_deepspec_draft` (allowed by name in tests/test_imports.py)."""
        from dspark.checkpoint import load_deepspec_draft

        return load_deepspec_draft(path, dtype=dtype, device=device, shared_embed=shared_embed, shared_head=shared_head,
                          kernels=kernels)

    # ------------------------------------------------------------------ backbone
    def project_context(self, features: torch.Tensor) -> torch.Tensor:
        """Tapped target features [..., F] → context rows C [..., d] = hidden_norm(fc(features))."""
        if features.shape[-1] != self.config.context_width:
            raise ValueError(f"context features have width {features.shape[-1]}, the draft expects "
                             f"{self.config.context_width} ({len(self.config.target_layer_ids)} taps × "
                             f"{self.config.target_hidden_size})")
        return self.hidden_norm(self.fc(features))

    def context_kv(self, c: torch.Tensor, positions: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Context rows C [..., N, d] at absolute `positions` [..., N] → per layer (k, v) [..., N, H_kv, hd]."""
        cos, sin = self.rope(positions)
        return [layer.self_attn.context_kv(c, cos, sin) for layer in self.layers]

    def _blocks(self, x: torch.Tensor, positions: torch.Tensor, ctx_kv: list[tuple[torch.Tensor, torch.Tensor]],
                ctx_mask: torch.Tensor, blk_valid: torch.Tensor) -> torch.Tensor:
        """x [N, Q, γ, d] block embeddings at positions [N, Q, γ] → post-norm h [N, Q, γ, d]."""
        cos, sin = self.rope(positions)
        for layer, (k, v) in zip(self.layers, ctx_kv):
            x = layer(x, cos, sin, k, v, ctx_mask, blk_valid)
        return self.norm(x)

    def block_hidden(self, block_ids: torch.Tensor, block_pos: torch.Tensor,
                     ctx_kv: list[tuple[torch.Tensor, torch.Tensor]], ctx_valid: torch.Tensor) -> torch.Tensor:
        """One block per request: block_ids / block_pos [R, γ], ctx_kv per layer (k, v) [R, S, H_kv, hd],
        ctx_valid [R, S] bool → post-norm h [R, γ, d].

        The block attends to its valid context rows and to all γ block rows. Invalid rows may hold
        anything, NaN included: they are zeroed before any product.
        """
        keep = ctx_valid[:, :, None, None]
        ctx_kv = [(torch.where(keep, k, 0.0), torch.where(keep, v, 0.0)) for k, v in ctx_kv]
        x = self.embed(block_ids).unsqueeze(1)  # [R, 1, γ, d]
        blk_valid = torch.ones_like(block_ids[:, :1], dtype=torch.bool)  # [R, 1]
        return self._blocks(x, block_pos.unsqueeze(1), ctx_kv, ctx_valid.unsqueeze(1), blk_valid)[:, 0]

    # ------------------------------------------------------------------ heads
    def base_logits(self, h: torch.Tensor) -> torch.Tensor:
        """h [..., d] → U = lm_head(h) [..., V] fp32 (`head_logits`)."""
        return self.head_logits(h)

    # ------------------------------------------------------------------ engine protocol (dspark/decode/dspark.py)
    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    @property
    def block_size(self) -> int:
        return self.config.block_size

    @property
    def block_input_token(self) -> int:
        return self.config.mask_token_id

    @property
    def tap_layers(self) -> tuple[int, ...]:
        return self.config.target_layer_ids

    @property
    def context_window(self) -> None:
        return None  # full attention over the whole committed prefix

    @property
    def has_markov_head(self) -> bool:
        return self.config.has_markov_head

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    context_rows = context_kv  # the engine's name for the cached per-layer rows

    def draft_block(self, block_ids: torch.Tensor, block_pos: torch.Tensor,
                    context: list[tuple[torch.Tensor, torch.Tensor]], context_valid: torch.Tensor,
                    anchor: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                    u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """`block_hidden`, `base_logits` and `sample_block` in one call → (tokens, Ũ, confidence logits)."""
        h = self.block_hidden(block_ids, block_pos, context, context_valid)
        return self.sample_block(self.base_logits(h), h, anchor, temperature, top_k, top_p, u)

    # ------------------------------------------------------------------ training
    def forward_train(self, input_ids: torch.Tensor, ctx_features: torch.Tensor, anchors: torch.Tensor,
                      keep: torch.Tensor) -> TrainOutput:
        """All K blocks of each sequence in one pass (dspark.md §1.5, §4.3).

        input_ids [B, S], ctx_features [B, S, F], anchors [B, K] (positions p ≤ S−2), keep [B, K]
        (0 = dummy block). Block k's rows [input_ids[p], MASK × (γ−1)] (dummy: all MASK) sit at
        positions p..p+γ−1, see context rows t < p and their own block; dummy blocks see nothing and
        output zeros. Markov and confidence heads are teacher-forced: prev_i = the token at p+i.
        """
        cfg = self.config
        b, s = input_ids.shape
        k = anchors.shape[1]
        keep = keep.bool()
        ctx_pos = torch.arange(s, device=input_ids.device).expand(b, s)  # [B, S]
        ctx_kv = self.context_kv(self.project_context(ctx_features), ctx_pos)
        positions = anchors.unsqueeze(-1) + torch.arange(cfg.block_size, device=anchors.device)  # [B, K, γ]
        mask_ids = torch.full((b, k, cfg.block_size), cfg.mask_token_id, dtype=input_ids.dtype,
                              device=input_ids.device)
        first = torch.where(keep, input_ids.gather(1, anchors), cfg.mask_token_id)  # [B, K]
        block_ids = torch.cat([first.unsqueeze(-1), mask_ids[..., 1:]], dim=-1)  # [B, K, γ]
        ctx_mask = (ctx_pos.unsqueeze(1) < anchors.unsqueeze(-1)) & keep.unsqueeze(-1)  # [B, K, S]

        h = self._blocks(self.embed(block_ids), positions, ctx_kv, ctx_mask, keep)  # [B, K, γ, d]
        labels = input_ids.gather(1, block_label_index(anchors, keep, s, cfg.block_size).flatten(1))
        labels = labels.view(b, k, cfg.block_size)
        prev = torch.cat([block_ids[..., :1], labels[..., :-1]], dim=-1)  # [B, K, γ]
        return TrainOutput(draft_logits=self.corrected_logits_tf(self.base_logits(h), prev, h),
                           confidence_logits=self.confidence_logits(h, prev), labels=labels, positions=positions)


__all__ = ["DraftModel"]
