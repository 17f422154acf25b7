"""The EAGLE-3 draft in DeepSpec's `Qwen3Eagle3Model` and `Gemma4Eagle3Model` layouts (SpecForge-style;
DeepSpec's deepspec/modeling/eagle3/{qwen3,gemma4}/modeling.py): the released Table 1 baselines load 1:1.

Vocabulary: R requests, S context rows, γ chain length (DeepSpec's ttt_length), d hidden (= the
target's), F = taps × d, H / H_kv query and KV heads, hd head dim, V vocabulary (the target's whole
vocabulary: DeepSpec's EAGLE-3 has no draft-vocabulary maps d2t / t2d).

    row i      g_i = fc(f_i) from the target's tapped features at position i, paired with the token
               at i+1 (training pairs hidden state i with token i+1; the RoPE position stays i)
    layer      x = [input_layernorm(embed(token)) ; hidden_norm(g)]  (2d wide), q/k/v = proj(x),
               q/k RMS-normed per head and rotated (Qwen3 rotate-half RoPE), causal attention over
               the rows so far; h = g + o_proj(attn); h = h + mlp(post_attention_layernorm(h))
    logits     lm_head(norm(h)); the chain feeds the un-normed h back as the next row's g
    chain      step 0 is row p−1 (g = fc(f_{p−1}), token = the anchor at p); step k ≥ 1 is the row
               at p−1+k with g = h_{k−1} and the token drafted at step k−1

The Gemma 4 layout is the same draft with Eagle3Config's named deltas, those of the Gemma 4 DSpark draft
(dspark.draft.deepspec, whose code computes them here too): embeddings × sqrt(d), attention scale 1,
values = the raw k_proj output (k_eq_v) through a scale-free RMSNorm, RoPE on a fraction of each head,
h = g + post_attention_layernorm(attn); h = (h + post_feedforward_layernorm(mlp(pre_feedforward_layernorm(h))))
· layer_scalar, a tanh-GELU MLP and soft-capped logits. The chain feeds back that scaled h.

Only a single decoder layer is supported, as DeepSpec's evaluator requires: committed rows' K/V then
depend only on their own inputs, so they can be cached from the target's features once, in any
order, and never rolled back (dspark.decode.eagle3).

NOTE: attention is plain PyTorch (scores in the weights' dtype, softmax in fp32), like
dspark.draft.deepspec.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from dspark.config import Eagle3Config
from dspark.draft.deepspec import DraftAttention, DraftMLP, TokenIO, rotate_half
from dspark.model.layers import RMSNorm


class Eagle3Attention(nn.Module):
    """q/k/v from the 2d-wide row input; GQA over [cached rows ; chain rows] given as keys."""

    def __init__(self, config: Eagle3Config):
        super().__init__()
        wide, hd = 2 * config.hidden_size, config.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, hd
        self.scale = hd ** -0.5 if config.attention_scale is None else config.attention_scale
        self.value_norm_eps = config.rms_norm_eps if config.value_norm else None
        self.q_proj = nn.Linear(wide, config.num_heads * hd, bias=False)
        self.k_proj = nn.Linear(wide, config.num_kv_heads * hd, bias=False)
        self.v_proj = None if config.k_eq_v else nn.Linear(wide, config.num_kv_heads * hd, bias=False)
        self.o_proj = nn.Linear(config.num_heads * hd, config.hidden_size, bias=False)
        self.q_norm = RMSNorm(hd, config.rms_norm_eps)
        self.k_norm = RMSNorm(hd, config.rms_norm_eps)

    # x [..., 2d] → k (normed, rotated), v (value-normed if the config says so) [..., H_kv, hd]: the DSpark
    # draft's own K/V (the same attribute names; only the input is 2d wide here).
    kv = DraftAttention.context_kv

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, ctx_k: torch.Tensor,
                ctx_v: torch.Tensor, ctx_valid: torch.Tensor, own_k: torch.Tensor, own_v: torch.Tensor) -> torch.Tensor:
        """One query row per request: x [R, 2d], cos/sin [R, hd/2]; it sees the cached rows ctx_k/ctx_v
        [R, S, H_kv, hd] where ctx_valid [R, S], and all of own_k/own_v [R, c, H_kv, hd] (the chain so far
        and itself, c ≥ 1) → [R, d]. Scores are taken apart so the cached rows are never copied."""
        groups = self.num_heads // self.num_kv_heads
        q = self.q_norm(self.q_proj(x).unflatten(-1, (self.num_heads, self.head_dim)))
        q = rotate_half(q, cos, sin).unflatten(-2, (self.num_kv_heads, groups))  # [R, H_kv, G, hd]
        s_ctx = torch.einsum("rkgd,rskd->rkgs", q, ctx_k).float().masked_fill(~ctx_valid[:, None, None, :],
                                                                               float("-inf"))
        s_own = torch.einsum("rkgd,rckd->rkgc", q, own_k).float()
        p = (torch.cat([s_ctx, s_own], -1) * self.scale).softmax(dim=-1).to(ctx_v.dtype)
        s = ctx_k.shape[1]
        out = torch.einsum("rkgs,rskd->rkgd", p[..., :s], ctx_v) + torch.einsum("rkgc,rckd->rkgd", p[..., s:], own_v)
        return self.o_proj(out.flatten(-3))


class Eagle3Layer(nn.Module):
    """The one decoder layer: attention over [embedding ; hidden] rows, residual on the hidden.

    NOTE: `post_attention_layernorm` is the MLP's input norm in Qwen3 but the attention output's norm in
    Gemma 4 (whose MLP input norm is `pre_feedforward_layernorm`), as in dspark.draft.deepspec.DraftLayer.
    """

    def __init__(self, config: Eagle3Config):
        super().__init__()
        d, eps = config.hidden_size, config.rms_norm_eps
        self.hidden_norm = RMSNorm(d, eps)
        self.input_layernorm = RMSNorm(d, eps)
        self.self_attn = Eagle3Attention(config)
        self.post_attention_layernorm = RMSNorm(d, eps)
        self.mlp = DraftMLP(config)
        self.sandwich_norms = config.sandwich_norms
        if config.sandwich_norms:
            self.pre_feedforward_layernorm = RMSNorm(d, eps)
            self.post_feedforward_layernorm = RMSNorm(d, eps)
            # A checkpoint buffer (1.0 in DeepSpec's drafts, never trained) that scales the layer's output.
            self.register_buffer("layer_scalar", torch.ones(1))

    def row_input(self, embedded: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """embed(token) [..., d], hidden g [..., d] → the attention input [..., 2d]."""
        return torch.cat([self.input_layernorm(embedded), self.hidden_norm(g)], dim=-1)

    def output(self, g: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        """The residual stream g [..., d] and the attention output [..., d] → the layer's output h [..., d]."""
        if not self.sandwich_norms:
            h = g + attn
            return h + self.mlp(self.post_attention_layernorm(h))
        h = g + self.post_attention_layernorm(attn)
        h = h + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(h)))
        return h * self.layer_scalar


class Eagle3Draft(TokenIO, nn.Module):
    """The draft; state_dict names are DeepSpec's saved names (its `save_pretrained` of the model)."""

    def __init__(self, config: Eagle3Config):
        super().__init__()
        self.config = config
        d = config.hidden_size
        self.embed_tokens = nn.Embedding(config.vocab_size, d)
        self.fc = nn.Linear(config.context_width, d, bias=False)
        self.layers = nn.ModuleList([Eagle3Layer(config)])
        self.norm = RMSNorm(d, config.rms_norm_eps)
        self.lm_head = nn.Linear(d, config.vocab_size, bias=False)

    # ------------------------------------------------------------------ construction
    @classmethod
    def empty(cls, config: Eagle3Config, *, dtype: torch.dtype = torch.float32,
              device: torch.device | str = "cpu") -> "Eagle3Draft":
        """Uninitialised weights allocated once on `device` in `dtype` (built on the meta device)."""
        with torch.device("meta"):
            model = cls(config)
        return model.to(dtype=dtype).to_empty(device=device)

    @classmethod
    def random(cls, config: Eagle3Config, *, seed: int = 0, dtype: torch.dtype = torch.float32,
               device: torch.device | str = "cpu") -> "Eagle3Draft":
        """Random weights (tests): linear N(0, 1/fan_in), embedding N(0, 1), norm weights U(0.5, 1.5);
        buffers (`layer_scalar`) 1."""
        model = cls.empty(config)
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("norm.weight"):
                    p.copy_(torch.rand(p.shape, generator=gen) + 0.5)
                elif name == "embed_tokens.weight":
                    p.copy_(torch.randn(p.shape, generator=gen))
                else:
                    p.copy_(torch.randn(p.shape, generator=gen) * p.shape[-1] ** -0.5)
            for b in model.buffers():
                b.fill_(1.0)
        return model.to(dtype=dtype, device=device)

    def check_target(self, target_config) -> None:
        """Refuse a target this draft was not made for (hidden size, vocabulary, tap depth), naming both."""
        cfg = self.config
        if target_config.hidden_size != cfg.hidden_size:
            raise ValueError(f"the EAGLE-3 draft reads target features of width {cfg.hidden_size} per tap; "
                             f"the target's hidden_size is {target_config.hidden_size}")
        if target_config.vocab_size != cfg.vocab_size:
            raise ValueError(f"the EAGLE-3 draft's vocabulary ({cfg.vocab_size}) is not the target's "
                             f"({target_config.vocab_size})")
        depth = target_config.num_layers
        if any(t >= depth for t in cfg.target_layer_ids):
            raise ValueError(f"the EAGLE-3 draft taps target layers {list(cfg.target_layer_ids)}; the target has "
                             f"{depth} layers")

    # ------------------------------------------------------------------ engine protocol (dspark/decode/eagle3.py)
    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    @property
    def block_size(self) -> int:
        return self.config.ttt_length

    @property
    def tap_layers(self) -> tuple[int, ...]:
        return self.config.target_layer_ids

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    def project_context(self, features: torch.Tensor) -> torch.Tensor:
        """Tapped target features [..., F] → g [..., d] = fc(features) (no norm: the layer norms it)."""
        if features.shape[-1] != self.config.context_width:
            raise ValueError(f"context features have width {features.shape[-1]}, the EAGLE-3 draft expects "
                             f"{self.config.context_width} ({len(self.config.target_layer_ids)} taps × "
                             f"{self.config.hidden_size})")
        return self.fc(features)

    def context_rows(self, g: torch.Tensor, next_ids: torch.Tensor, positions: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """Committed rows: g [..., d] at `positions` [...] paired with the token that follows each,
        `next_ids` [...] → (k, v) [..., H_kv, hd], what the engine caches."""
        layer = self.layers[0]
        x = layer.row_input(self.embed(next_ids), g)
        return layer.self_attn.kv(x, *self.rope(positions))

    def step(self, g: torch.Tensor, token: torch.Tensor, position: torch.Tensor, ctx_k: torch.Tensor,
             ctx_v: torch.Tensor, ctx_valid: torch.Tensor, own_k: torch.Tensor | None = None,
             own_v: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One new row per request: g [R, d], token [R], position [R]. It attends to the cached rows
        ctx_k/ctx_v [R, S, H_kv, hd] where ctx_valid [R, S], to the chain's earlier rows own_k/own_v
        [R, c, H_kv, hd] (None: none) and to itself → (h [R, d] un-normed, own_k, own_v with its row
        appended [R, c+1, H_kv, hd])."""
        layer = self.layers[0]
        x = layer.row_input(self.embed(token), g)  # [R, 2d]
        cos, sin = self.rope(position)
        k, v = layer.self_attn.kv(x, cos, sin)
        own_k = k.unsqueeze(1) if own_k is None else torch.cat([own_k, k.unsqueeze(1)], 1)
        own_v = v.unsqueeze(1) if own_v is None else torch.cat([own_v, v.unsqueeze(1)], 1)
        return layer.output(g, layer.self_attn(x, cos, sin, ctx_k, ctx_v, ctx_valid, own_k, own_v)), own_k, own_v

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """h [..., d] (un-normed) → lm_head(norm(h)) [..., V] fp32, soft-capped if the config says so (products
        in the weights' dtype)."""
        return self.head_logits(self.norm(h))

    def chain(self, g0: torch.Tensor, anchor: torch.Tensor, anchor_pos: torch.Tensor, keys: torch.Tensor,
              values: torch.Tensor, valid: torch.Tensor, gamma: int,
              choose: Callable[[int, torch.Tensor], torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """γ chained drafts at anchors p = anchor_pos [R] with tokens anchor [R] (the token at p).

        g0 [R, d] = fc(f_{p−1}); keys/values [R, S, H_kv, hd] the committed rows at positions < p−1
        (valid [R, S]; row p−1 is step 0 itself). `choose(k, logits_k [R, V])` returns the token
        fed to step k+1 (a sample, or the true token when teacher-forced) → (tokens [R, γ], logits
        [R, γ, V] fp32). The chain's own rows live only inside this call. Invalid rows may hold anything,
        NaN included: their scores are masked and their values zeroed (0 · NaN would leak) once per call."""
        values = torch.where(valid[:, :, None, None], values, 0.0)
        g, token, pos = g0, anchor, anchor_pos - 1
        tokens, logits, own_k, own_v = [], [], None, None
        for k in range(gamma):
            g, own_k, own_v = self.step(g, token, pos + k, keys, values, valid, own_k, own_v)
            logits.append(self.logits(g))
            token = choose(k, logits[-1])
            tokens.append(token)
        return torch.stack(tokens, 1), torch.stack(logits, 1)


__all__ = ["Eagle3Draft"]
