"""Dense HF decoder targets: Qwen3, Llama-3 and Gemma 4 text (HF transformers 5.24 semantics).

Module and parameter names equal HF's in-memory `Qwen3ForCausalLM` / `LlamaForCausalLM` /
`Gemma4ForCausalLM` names (`model.embed_tokens`, `model.layers.N.self_attn.q_proj`, ..., `lm_head`),
so an HF `state_dict` loads 1:1 (`dspark.checkpoint.hf` reads snapshot directories). One layer body
serves the three families through DenseConfig's switches:

    x ─ input_layernorm ─ attention ─ [post_attention_layernorm] ─ + ─ [pre_feedforward_layernorm |
        post_attention_layernorm] ─ MLP ─ [post_feedforward_layernorm] ─ + ─ [× layer_scalar]

(brackets: Gemma 4's sandwich norms; Qwen3 / Llama name their pre-MLP norm post_attention_layernorm).
Attention: q/k/v projections, [per-head q/k RMSNorm, unweighted v RMSNorm], NeoX (rotate-half) RoPE
per layer type, GQA, causal with an optional sliding window W (keys p−W < j ≤ p). Vocabulary: T flat
tokens, B batch, S sequence, D hidden, H / Hkv heads, hd head dim.

fp32 where HF keeps fp32 or better: norms, RoPE, softmax and the logits (and their soft-capping);
norm weights stay fp32 in a bf16 model. The dense `run` is the specification the cached ragged
`forward_batch` (paged K/V through `dspark.ops.paged_attention`) is tested against.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from dspark import ops
from dspark.config import DenseConfig, DenseRope
from dspark.model.batch import Batch
from dspark.model.cache import DenseCache
from dspark.model.decoder import cast_keeping_fp32_islands, randomize_
from dspark.model.layers import RMSNorm
from dspark.model.protocol import check_input_ids
from dspark.model.protocol import TargetOutput


def dense_inv_freq(rope: DenseRope, head_dim: int) -> torch.Tensor:
    """Inverse frequencies [hd/2] fp32 of one rotate-half table (HF's rope_type semantics)."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
    inv = 1.0 / rope.theta ** exponents
    if rope.kind == "default":
        return inv
    if rope.kind == "proportional":
        # Only the first pairs rotate (frequencies over the whole hd); the rest get frequency 0.
        rotated = int(rope.partial_rotary_factor * head_dim // 2)
        return torch.cat([inv[:rotated], torch.zeros(head_dim // 2 - rotated)]) / rope.factor
    # llama3: long wavelengths divided by `factor`, short ones kept, a smooth ramp between.
    low_wavelen = rope.original_max_position / rope.low_freq_factor
    high_wavelen = rope.original_max_position / rope.high_freq_factor
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > low_wavelen, inv / rope.factor, inv)
    smooth = (rope.original_max_position / wavelen - rope.low_freq_factor) / (rope.high_freq_factor -
                                                                              rope.low_freq_factor)
    smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


def rotate_half_rope(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """x [..., heads, hd] at positions [...] → rotated (pairs (i, i + hd/2)), computed in fp32, cast back."""
    freqs = positions.float().unsqueeze(-1) * inv_freq  # [..., hd/2]
    cos, sin = freqs.cos().unsqueeze(-2), freqs.sin().unsqueeze(-2)  # broadcast over heads
    xf = x.float()
    x1, x2 = xf[..., : x.shape[-1] // 2], xf[..., x.shape[-1] // 2:]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)


def attend_dense(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, window: int | None) -> torch.Tensor:
    """Causal (windowed) GQA from position 0, no cache: q [B, S, H, hd], k/v [B, S, Hkv, hd] → [B, S, H, hd].
    Scores, softmax and the weighted sum in fp32."""
    b, s, h, hd = q.shape
    groups = h // k.shape[2]
    qg = q.float().unflatten(2, (k.shape[2], groups))  # [B, S, Hkv, G, hd]
    scores = torch.einsum("bskgd,btkd->bkgst", qg, k.float()) * scale  # [B, Hkv, G, S, S]
    i = torch.arange(s, device=q.device)
    allowed = i.unsqueeze(0) <= i.unsqueeze(1)  # [S query, S key]
    if window is not None:
        allowed &= i.unsqueeze(0) > i.unsqueeze(1) - window
    probs = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
    out = torch.einsum("bkgst,btkd->bskgd", probs, v.float())
    return out.flatten(2, 3).to(q.dtype)


class DenseAttention(nn.Module):
    def __init__(self, config: DenseConfig, layer: int):
        super().__init__()
        d, h, hd, kv = config.hidden_size, config.num_heads, config.layer_head_dim(layer), config.layer_kv_heads(layer)
        self.num_heads, self.num_kv_heads, self.head_dim = h, kv, hd
        self.scale, self.window, self.eps = config.layer_scale(layer), config.layer_window(layer), config.rms_norm_eps
        self.qk_norm, self.v_norm, self.kernels = config.qk_norm, config.v_norm, config.kernels
        bias = config.attention_bias
        self.q_proj = nn.Linear(d, h * hd, bias=bias)
        self.k_proj = nn.Linear(d, kv * hd, bias=bias)
        # Gemma 4's k_eq_v layers take V from k_proj's output (before k_norm and RoPE).
        self.v_proj = None if config.layer_k_eq_v(layer) else nn.Linear(d, kv * hd, bias=bias)
        self.o_proj = nn.Linear(h * hd, d, bias=bias)
        if config.qk_norm:
            self.q_norm = RMSNorm(hd, config.rms_norm_eps)
            self.k_norm = RMSNorm(hd, config.rms_norm_eps)
        self.rope = config.layer_rope(layer)
        self.register_buffer("inv_freq", dense_inv_freq(self.rope, hd), persistent=False)

    def qkv(self, x: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [..., D] at positions [...] → q [..., H, hd], k / v [..., Hkv, hd] (normed, rotated)."""
        q = self.q_proj(x).unflatten(-1, (self.num_heads, self.head_dim))
        k = self.k_proj(x).unflatten(-1, (self.num_kv_heads, self.head_dim))
        v = k if self.v_proj is None else self.v_proj(x).unflatten(-1, (self.num_kv_heads, self.head_dim))
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.v_norm:
            vf = v.float()  # HF: unweighted RMSNorm in fp32, cast once
            v = (vf * torch.rsqrt(vf.square().mean(-1, keepdim=True) + self.eps)).to(v.dtype)
        return rotate_half_rope(q, positions, self.inv_freq), rotate_half_rope(k, positions, self.inv_freq), v

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, S, D] at positions 0..S−1 → [B, S, D]."""
        q, k, v = self.qkv(x, torch.arange(x.shape[1], device=x.device))
        return self.o_proj(attend_dense(q, k, v, self.scale, self.window).flatten(-2))

    def forward_cached(self, x: torch.Tensor, batch: Batch, slot: torch.Tensor, cache_k: torch.Tensor,
                       cache_v: torch.Tensor, block_table: torch.Tensor) -> torch.Tensor:
        """x [T, D] of a flat ragged batch → [T, D]: writes the batch's K/V into the pages at their positions,
        then attends over the request's pages (its own new rows included)."""
        q, k, v = self.qkv(x, batch.positions)
        page_size = cache_k.shape[1]
        pos = batch.positions
        # Padding writes the trash page 0 (its position may lie past the block table's columns).
        column = (pos // page_size).clamp(max=block_table.shape[1] - 1)
        page = torch.where(batch.valid, block_table[slot, column], 0)
        cache_k[page, pos % page_size] = k.to(cache_k.dtype)
        cache_v[page, pos % page_size] = v.to(cache_v.dtype)
        # Padding queries read the trash page at position 0 (the op's convention for a dummy slot).
        out = ops.paged_attention(q, cache_k, cache_v, block_table, slot, torch.where(batch.valid, pos, 0), self.scale,
                                  window=self.window, kernels=self.kernels)
        return self.o_proj(out.flatten(-2))


class DenseMLP(nn.Module):
    def __init__(self, config: DenseConfig):
        super().__init__()
        d, i, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_proj = nn.Linear(d, i, bias=bias)
        self.up_proj = nn.Linear(d, i, bias=bias)
        self.down_proj = nn.Linear(i, d, bias=bias)
        self.tanh_gelu = config.hidden_act == "gelu_pytorch_tanh"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = self.gate_proj(x)
        act = F.gelu(g, approximate="tanh") if self.tanh_gelu else F.silu(g)
        return self.down_proj(act * self.up_proj(x))


class DenseDecoderLayer(nn.Module):
    def __init__(self, config: DenseConfig, layer: int):
        super().__init__()
        d, eps = config.hidden_size, config.rms_norm_eps
        self.sandwich = config.sandwich_norms
        self.self_attn = DenseAttention(config, layer)
        self.mlp = DenseMLP(config)
        self.input_layernorm = RMSNorm(d, eps)
        self.post_attention_layernorm = RMSNorm(d, eps)
        if self.sandwich:
            self.pre_feedforward_layernorm = RMSNorm(d, eps)
            self.post_feedforward_layernorm = RMSNorm(d, eps)
            self.register_buffer("layer_scalar", torch.ones(1))

    def forward(self, h: torch.Tensor, attend) -> torch.Tensor:
        """h [..., D] residual stream → the stream after this layer; `attend(self_attn, x)` runs the
        attention (dense or cached) on the normed input."""
        a = attend(self.self_attn, self.input_layernorm(h))
        if not self.sandwich:
            h = h + a
            return h + self.mlp(self.post_attention_layernorm(h))
        h = h + self.post_attention_layernorm(a)
        h = h + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(h)))
        return h * self.layer_scalar


class DenseBackbone(nn.Module):
    """HF's `model.*` namespace: embeddings, decoder layers, final norm."""

    def __init__(self, config: DenseConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DenseDecoderLayer(config, i) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class DenseTarget(nn.Module):
    """A dense HF causal LM behind the Target protocol (no MTP module)."""

    def __init__(self, config: DenseConfig):
        super().__init__()
        self.config = config
        self.model = DenseBackbone(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self._tie()

    def _tie(self) -> None:
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    # ---------------------------------------------------------------- construction
    @classmethod
    def empty(cls, config: DenseConfig, *, dtype: torch.dtype = torch.float32,
              device: torch.device | str = "cpu") -> "DenseTarget":
        """Uninitialised weights allocated once on `device` in `dtype` (norm weights stay fp32)."""
        with torch.device("meta"):
            model = cls(config)
        model.to_dtype(dtype)
        model.to_empty(device=device)
        model._tie()
        model.reset_buffers()
        return model

    @classmethod
    def random(cls, config: DenseConfig, *, seed: int = 0, dtype: torch.dtype = torch.float32,
               device: torch.device | str = "cpu") -> "DenseTarget":
        """Random weights: matrices and biases z/sqrt(fan), norm weights 1+0.1z, layer scalars 1."""
        model = cls.empty(config, dtype=torch.float32, device=device)
        randomize_(model, torch.Generator(device="cpu").manual_seed(seed))
        return model.to_dtype(dtype)

    def to_dtype(self, dtype: torch.dtype) -> "DenseTarget":
        """Cast floating parameters to `dtype`, keeping norm weights fp32 (never use `.to(bf16)`)."""
        return cast_keeping_fp32_islands(self, dtype)

    def reset_buffers(self) -> None:
        """Recompute the non-persistent rotary tables and the layer scalars' HF init after `to_empty`."""
        for m in self.modules():
            if isinstance(m, DenseAttention):
                m.inv_freq = dense_inv_freq(m.rope, m.head_dim).to(m.inv_freq.device)
            if isinstance(m, DenseDecoderLayer) and m.sandwich:
                m.layer_scalar.fill_(1)

    def new_cache(self, *, max_batch: int, max_seq_len: int, max_provisional: int = 1, page_size: int | None = None,
                  memory_budget: int | None = None, with_mtp: bool = False) -> DenseCache:
        """The paged K/V cache `forward_batch` reads and writes, on the model's device and in its dtype."""
        return DenseCache(self.config, max_batch=max_batch, max_seq_len=max_seq_len, max_provisional=max_provisional,
                          page_size=page_size, memory_budget=memory_budget, dtype=self.dtype,
                          device=self.lm_head.weight.device, with_mtp=with_mtp)

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    @property
    def has_mtp(self) -> bool:
        return False

    # ---------------------------------------------------------------- dense forward
    def check_input_ids(self, input_ids: torch.Tensor) -> None:
        """API-boundary validation (host sync): shape, dtype, vocabulary range, length."""
        check_input_ids(self.config, input_ids)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        e = self.model.embed_tokens(input_ids)
        if self.config.embed_scale is None:
            return e
        # HF rounds the scale to the weight dtype first (bf16: sqrt(3072) = 55.4 becomes 55.5).
        return e * torch.tensor(self.config.embed_scale, dtype=e.dtype, device=e.device)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Last layer's output [..., D] → fp32 logits [..., V] (final norm, head, soft-capping)."""
        logits = F.linear(self.model.norm(h).float(), self.lm_head.weight.float())
        cap = self.config.final_logit_softcapping
        return logits if cap is None else cap * torch.tanh(logits / cap)

    def run(self, input_ids: torch.Tensor, tap_layers: tuple[int, ...] = ()) -> TargetOutput:
        """Full sequences from position 0, no cache: input_ids [B, S] → TargetOutput(logits [B, S, V] fp32,
        streams [B, S, 1, D] = the last layer's output, taps {j: layer j's output [B, S, D]}; j = −1 is the
        (scaled) embedding output, DeepSpec's convention)."""
        self.check_input_ids(input_ids)
        for layer in tap_layers:
            if not -1 <= layer < self.config.num_layers:
                raise ValueError(f"tap layer {layer} outside -1..{self.config.num_layers - 1}")
        h = self.embed(input_ids)
        taps = {-1: h} if -1 in tap_layers else {}
        for i, layer in enumerate(self.model.layers):
            h = layer(h, lambda attn, x: attn(x))
            if i in tap_layers:
                taps[i] = h
        return TargetOutput(self.logits(h), h.unsqueeze(-2), taps)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids [B, S] (positions 0..S−1, no cache) → fp32 logits [B, S, V]."""
        return self.run(input_ids).logits

    # ---------------------------------------------------------------- cached ragged forward
    def forward_batch(self, batch: Batch, cache: DenseCache, tap_layers: tuple[int, ...] = ()) -> TargetOutput:
        """One forward over a flat ragged batch, extending `cache` (architecture.md §2).

        Returns fp32 logits [L, V] for `batch.logits_rows`, the last layer's output [T, 1, D] and the
        tapped layers' outputs [T, D] (−1: the embedding output). Preconditions (documented, not checked: no host syncs here): ids
        in the vocabulary, each row's positions are cache_len, cache_len+1, ..., its slot admitted with
        room for them. Rows past a request's committed length are simply overwritten (rollback is free).
        """
        if not batch.causal:
            raise ValueError("a target forward is causal; bidirectional batches are for draft blocks")
        slot = batch.slot[batch.token_row]  # [T]
        h = self.embed(batch.input_ids)  # [T, D]
        taps = {-1: h} if -1 in tap_layers else {}
        for i, layer in enumerate(self.model.layers):
            kv = cache.layers[i]
            h = layer(h, lambda attn, x: attn.forward_cached(x, batch, slot, kv.k, kv.v, cache.block_table))
            if i in tap_layers:
                taps[i] = h
        return TargetOutput(self.logits(h[batch.logits_rows]), h.unsqueeze(-2), taps)


__all__ = ["DenseTarget", "attend_dense", "dense_inv_freq", "rotate_half_rope"]
