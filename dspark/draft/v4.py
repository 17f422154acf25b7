"""DeepSeek's V4 DSpark layout: draft stages stored as `mtp.0..mtp.{S−1}` in the target checkpoint
(dspark_v4.md).

Context: for each committed position t, the stream mean of each tapped target layer's output,
concatenated [taps·D], projected once: main_x_t = main_norm(main_proj(f_t)). Each stage turns
main_x_t into one latent K=V row with its OWN wkv / kv_norm / RoPE at position t; the engine keeps
the last 128 (the sliding window) such rows per stage, committed rows only. A block
[anchor, NOISE×(γ−1)] at positions p..p+γ−1 runs through S full V4 blocks (mHC, MQA latent
attention with sinks, score-routed MoE) whose attention reads [context rows ; block rows] without a
causal mask. Then hc_head → norm → the target's LM head → Markov head, and the confidence head on
the PRE-norm collapsed state without bias (dspark_v4.md §4.4; a constructor switch, since TRT-LLM
feeds the post-norm state, §6.10).

Parameter names are ours (`stages.{s}.self_attn.q_a_proj.weight`, `main_proj.weight`, ...);
`dspark.checkpoint.v4` maps them to the release's `mtp.{s}.*` names. The embedding and LM head are the
target's and are not parameters of the draft.
"""

from __future__ import annotations

import torch
from torch import nn

from dspark import ops
from dspark.config import ModelConfig
from dspark.model.layers import RMSNorm, linear
from dspark.draft.protocol import TrainOutput, block_label_index
from dspark.draft.heads import BlockHeads, ConfidenceHead, MarkovHead
from dspark.model.mhc import HyperHead
from dspark.model.decoder import DecoderLayer, cast_keeping_fp32_islands, randomize_, reset_rotary_buffers


class V4DSparkDraft(BlockHeads, nn.Module):
    def __init__(self, config: ModelConfig, num_stages: int, *, confidence_pre_norm: bool = True):
        super().__init__()
        ds = config.dspark
        if ds is None:
            raise ValueError("a V4 DSpark draft needs the target config's dspark_* fields")
        bad = [t for t in ds.target_layer_ids if not 0 <= t < config.num_layers]
        if bad:
            raise ValueError(f"dspark_target_layer_ids {bad} outside the target's layers 0..{config.num_layers - 1}")
        if not 0 <= ds.noise_token_id < config.vocab_size:
            raise ValueError(f"dspark_noise_token_id {ds.noise_token_id} outside the vocabulary")
        if num_stages < 1 or ds.block_size < 1 or ds.markov_rank < 1:
            raise ValueError("need at least one stage, block_size >= 1 and markov_rank >= 1")
        self.config, self.kernels = config, config.kernels
        self.tap_layers = tuple(ds.target_layer_ids)
        self.block_size, self.block_input_token = ds.block_size, ds.noise_token_id
        self.vocab_size, self.context_window = config.vocab_size, config.sliding_window
        self.confidence_pre_norm = confidence_pre_norm
        d = config.hidden_size
        self.main_proj = linear(len(self.tap_layers) * d, d)
        self.main_norm = RMSNorm(d, config.rms_norm_eps)
        self.stages = nn.ModuleList(DecoderLayer(config, "sliding", "score") for _ in range(num_stages))
        self.hc_head = HyperHead(config)
        self.norm = RMSNorm(d, config.rms_norm_eps)
        self.markov_head = MarkovHead(config.vocab_size, ds.markov_rank, "vanilla")
        self.confidence_head = ConfidenceHead(d + ds.markov_rank, bias=False)
        self.confidence_with_markov = True
        self.has_markov_head = True
        self._shared: tuple[nn.Embedding, nn.Linear] | None = None  # the target's, not our parameters

    def attach(self, target) -> "V4DSparkDraft":
        """Use `target`'s embedding and LM head (the release stores no copies)."""
        if target.config.hidden_size != self.config.hidden_size or target.config.vocab_size != self.vocab_size:
            raise ValueError("the draft does not belong to this target (hidden size or vocabulary differ)")
        self._shared = (target.model.embed_tokens, target.lm_head)
        return self

    @property
    def device(self) -> torch.device:
        return self.main_proj.weight.device

    def _target_parts(self) -> tuple[nn.Embedding, nn.Linear]:
        if self._shared is None:
            raise RuntimeError("attach(target) first: the draft uses the target's embedding and LM head")
        return self._shared

    # ---------------------------------------------------------------- context
    def project_context(self, features: torch.Tensor) -> torch.Tensor:
        """features [N, taps·D] (stream means of the tapped layers) → main_x [N, D]."""
        return self.main_norm(self.main_proj(features.to(self.main_proj.weight.dtype)))

    def context_rows(self, main_x: torch.Tensor, positions: torch.Tensor) -> list[tuple[torch.Tensor]]:
        """main_x [N, D] at `positions` [N] → per stage (one latent K=V row [N, hd],)."""
        rows = []
        for stage in self.stages:
            cos, sin = stage.self_attn.rotary(positions)
            rows.append((stage.self_attn.project_kv(main_x, cos, sin),))
        return rows

    # ---------------------------------------------------------------- block
    def block_hidden(self, block_ids: torch.Tensor, block_pos: torch.Tensor, context: list[tuple[torch.Tensor]],
                     context_valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """block_ids, block_pos [R, γ]; context per stage ([R, C, hd],); context_valid [R, C] →
        (pre-norm collapsed state h_pre [R, γ, D], post-norm h [R, γ, D])."""
        gamma = block_ids.shape[1]
        allowed = torch.cat([context_valid, context_valid.new_ones(context_valid.shape[0], gamma)], dim=1)
        return self._stages(block_ids, block_pos, [rows for (rows,) in context], allowed.unsqueeze(1).expand(-1, gamma, -1))

    def _stages(self, block_ids: torch.Tensor, block_pos: torch.Tensor, context: list[torch.Tensor],
                allowed: torch.Tensor, embed_grad: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """N blocks: ids / positions [N, γ], context rows per stage [N, C, hd], allowed [N, γ, C+γ]
        (query row × [context ; block] keys) → (h_pre, h) [N, γ, D]."""
        embed, _ = self._target_parts()
        with torch.set_grad_enabled(embed_grad and torch.is_grad_enabled()):
            x = embed(block_ids)  # [N, γ, D]; the target's embedding is frozen
        streams = x.unsqueeze(-2).expand(*x.shape[:-1], self.config.hc_mult, -1).contiguous()
        key_ok = allowed.any(1).unsqueeze(-1)  # [N, C+γ, 1]: rows no query reads may hold garbage
        for stage, rows in zip(self.stages, context):
            def attend(attn, h, rows=rows):
                cos, sin = attn.rotary(block_pos)
                q, _ = attn.project_q(h, cos, sin)  # [N, γ, H, hd]
                keys = torch.cat([rows.to(h.dtype), attn.project_kv(h, cos, sin)], dim=1)  # [N, C+γ, hd]
                keys = torch.where(key_ok, keys, 0.0)
                o = ops.sink_attention(q, keys, allowed, attn.sinks, attn.scale, kernels=attn.kernels)
                return attn.project_out(o, cos, sin)

            streams = stage(streams, block_ids, attend)
        h_pre = self.hc_head(streams)
        return h_pre, self.norm(h_pre)

    def forward_train(self, input_ids: torch.Tensor, ctx_features: torch.Tensor, anchors: torch.Tensor,
                      keep: torch.Tensor) -> TrainOutput:
        """All K blocks of each sequence in one pass, the V4 way: block k at anchor p sees the context
        rows of positions [p − W, p) (the ring an engine would hold) and its own block; dummy blocks see
        nothing. Markov and confidence heads are teacher-forced (prev_i = the token at p+i)."""
        b, s = input_ids.shape
        k, gamma = anchors.shape[1], self.block_size
        keep = keep.bool()
        ctx_pos = torch.arange(s, device=input_ids.device)
        rows = [r for (r,) in self.context_rows(self.project_context(ctx_features), ctx_pos.expand(b, s))]  # [B, S, hd]
        first = torch.where(keep, input_ids.gather(1, anchors), self.block_input_token)  # [B, K]
        block_ids = torch.cat([first.unsqueeze(-1), first.new_full((b, k, gamma - 1), self.block_input_token)], -1)
        positions = anchors.unsqueeze(-1) + torch.arange(gamma, device=anchors.device)  # [B, K, γ]
        p = anchors.unsqueeze(-1)
        ctx_ok = (ctx_pos < p) & (ctx_pos >= p - self.context_window) & keep.unsqueeze(-1)  # [B, K, S]
        allowed = torch.cat([ctx_ok, keep.unsqueeze(-1).expand(b, k, gamma)], dim=-1)  # [B, K, S+γ]
        allowed = allowed.unsqueeze(2).expand(b, k, gamma, s + gamma).reshape(b * k, gamma, s + gamma)
        context = [r.unsqueeze(1).expand(b, k, s, r.shape[-1]).reshape(b * k, s, -1) for r in rows]
        h_pre, h = self._stages(block_ids.view(b * k, gamma), positions.view(b * k, gamma), context, allowed)
        h_pre, h = h_pre.view(b, k, gamma, -1), h.view(b, k, gamma, -1)
        labels = input_ids.gather(1, block_label_index(anchors, keep, s, gamma).flatten(1)).view(b, k, gamma)
        prev = torch.cat([block_ids[..., :1], labels[..., :-1]], dim=-1)  # [B, K, γ]
        conf_input = (h_pre if self.confidence_pre_norm else h).float()
        return TrainOutput(draft_logits=self.corrected_logits_tf(self.base_logits(h), prev, h.float()),
                           confidence_logits=self.confidence_logits(conf_input, prev), labels=labels,
                           positions=positions)

    def base_logits(self, h: torch.Tensor) -> torch.Tensor:
        """h [..., D] → the target LM head's logits [..., V] in fp32 (upcast, as the reference)."""
        _, head = self._target_parts()
        return torch.nn.functional.linear(h.float(), head.weight.float())

    def draft_block(self, block_ids, block_pos, context, context_valid, anchor, temperature, top_k, top_p, u):
        """The engine protocol (dspark/decode/dspark.py): tokens, corrected logits, confidence logits."""
        h_pre, h = self.block_hidden(block_ids, block_pos, context, context_valid)
        conf_input = (h_pre if self.confidence_pre_norm else h).float()
        return self.sample_block(self.base_logits(h), h.float(), anchor, temperature, top_k, top_p, u,
                                 h_confidence=conf_input)

    # ---------------------------------------------------------------- construction
    @classmethod
    def empty(cls, config: ModelConfig, num_stages: int, *, dtype: torch.dtype = torch.float32,
              device: torch.device | str = "cpu", **kw) -> "V4DSparkDraft":
        with torch.device("meta"):
            draft = cls(config, num_stages, **kw)
        cast_keeping_fp32_islands(draft, dtype)
        draft.to_empty(device=device)
        reset_rotary_buffers(draft)
        return draft

    @classmethod
    def random(cls, config: ModelConfig, num_stages: int, *, seed: int = 0, dtype: torch.dtype = torch.float32,
               device: torch.device | str = "cpu", **kw) -> "V4DSparkDraft":
        draft = cls.empty(config, num_stages, device=device, **kw)
        randomize_(draft, torch.Generator().manual_seed(seed))
        return cast_keeping_fp32_islands(draft, dtype)
