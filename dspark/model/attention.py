"""V4 attention: one shared latent K=V head with sinks, sliding window, and the CSA / HCA compressors.

Each module exposes its pieces (projections, window pooling, indexer scoring) so that the dense
full-sequence forward here and the cached ragged forward of the engine share every formula and
differ only in where keys come from. Facts: deepseek_v4.md §6–§9.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from dspark import ops
from dspark.config import ModelConfig
from dspark.model.batch import StepIndex
from dspark.model.cache import LayerCache
from dspark.model.layers import GroupedLinear, RMSNorm, RotaryTable, apply_rope, linear, unweighted_rms_norm
from dspark.model.parallel import Parallel


class IndexerTargets(NamedTuple):
    scores: torch.Tensor  # [B, S, W] fp32 indexer scores (gradient reaches the indexer only)
    mass: torch.Tensor  # [B, S, W] the main attention's mass over causal entries, no gradient
    causal: torch.Tensor  # [B, S, W] bool, entries query t may use


class Compressor(nn.Module):
    """Pools the raw (kv, gate) projections of each complete window of m tokens into one entry.

    HCA (`overlap=False`): entry w pools the m tokens of window w. CSA (`overlap=True`, projections of
    width 2C): each token's first half (Ca) feeds the NEXT window's entry and its second half (Cb)
    its own, so entry w pools 2m slots: Ca of window w−1 then Cb of window w (window −1 is empty).
    Entries are kv_norm'ed and roped (compress table) at position w·m.
    """

    def __init__(self, config: ModelConfig, width: int, rate: int, overlap: bool, rotary: RotaryTable):
        super().__init__()
        series = 2 if overlap else 1
        self.width, self.rate, self.overlap = width, rate, overlap
        self.kernels = config.kernels
        self.kv_proj = linear(config.hidden_size, series * width)
        self.gate_proj = linear(config.hidden_size, series * width)
        self.position_bias = nn.Parameter(torch.empty(rate, series * width))
        self.kv_norm = RMSNorm(width, config.rms_norm_eps)
        self.rotary = rotary

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [..., D] → raw kv, gate [..., series·C]; the gate WITHOUT the position bias (cacheable)."""
        return self.kv_proj(x), self.gate_proj(x)

    def pool(self, kv: torch.Tensor, gate: torch.Tensor, prev_kv: torch.Tensor | None,
             prev_gate: torch.Tensor | None, window: torch.Tensor) -> torch.Tensor:
        """One entry per window.

        kv, gate [..., m, series·C]: raw projections of the window's m tokens (in slot order);
        prev_kv, prev_gate: the same for window w−1 (CSA only; a gate of −inf marks an empty slot);
        window [...] int: the window index w. → entries [..., C] in kv's dtype.
        """
        gate = gate.float() + self.position_bias
        if self.overlap:
            c = self.width
            prev_gate = prev_gate.float() + self.position_bias
            kv = torch.cat([prev_kv[..., :c], kv[..., c:]], dim=-2)  # [..., 2m, C]
            gate = torch.cat([prev_gate[..., :c], gate[..., c:]], dim=-2)
        entry = self.kv_norm(ops.compress_windows(kv, gate, kernels=self.kernels).to(kv.dtype))
        cos, sin = self.rotary(window * self.rate)
        return apply_rope(entry, cos, sin)

    def write_closing_entries(self, x: torch.Tensor, idx: StepIndex, raw_kv: torch.Tensor, raw_gate: torch.Tensor,
                              pool: torch.Tensor, block_table: torch.Tensor, dummy_slot: int) -> None:
        """Cached path: pool every window whose last token is in this forward, store it in the paged
        `pool` [pages, P/m, C], then append this forward's raw projections to the rings."""
        m = self.rate
        kv, gate = self.project(x)  # [T, series·C]: every token's, for the rings
        sel, window, page, row = idx.memo(("closing tokens", m, pool.shape[1]),
                                          lambda: self.closing_tokens(idx, pool, block_table))
        cur = window.clamp(min=0).unsqueeze(-1) * m + torch.arange(m, device=x.device)  # [n, m]
        cur_kv, cur_gate = sel.gather(kv, raw_kv, cur), sel.gather(gate, raw_gate, cur)
        prev_kv = prev_gate = None
        if self.overlap:
            prev = cur - m
            has_prev = (prev >= 0).unsqueeze(-1)
            prev_kv = torch.where(has_prev, sel.gather(kv, raw_kv, prev), 0.0)
            prev_gate = torch.where(has_prev, sel.gather(gate, raw_gate, prev), float("-inf"))
        entry = self.pool(cur_kv, cur_gate, prev_kv, prev_gate, window.clamp(min=0))  # [n, C]
        pool[page, row] = entry.to(pool.dtype)
        idx.ring_write(raw_kv, kv, dummy_slot)
        idx.ring_write(raw_gate, gate, dummy_slot)

    def closing_tokens(self, idx: StepIndex, pool: torch.Tensor, block_table: torch.Tensor):
        """The tokens that may close a window of this rate and where their entries go → (their StepIndex
        (n tokens), window [n], page [n] (0, the trash page, where a token closes nothing), row in the
        page [n]). The same for every layer of one rate and page layout: built once per forward.

        Only closing tokens need an entry (each pools m or 2m raw rows). A request's n new tokens close at
        most n // m + 1 windows, so at most T // m + R do: a bound from shapes, a sync-free selection."""
        m, t = self.rate, idx.positions.shape[0]
        closes = idx.valid & ((idx.positions + 1) % m == 0)  # [T]
        sel, bound = idx, min(t, t // m + idx.batch.slot.shape[0] - 1)
        if bound < t:
            order = torch.argsort((~closes).to(torch.int8), stable=True)[:bound]  # closing tokens first
            sel, closes = idx.select(order), closes[order]
        window = (sel.positions + 1) // m - 1  # the window a token closes (when (t+1) mod m == 0)
        page_size = pool.shape[1] * m
        first = window.clamp(min=0) * m
        # Padding rows may carry any position: clamp the page lookup, their writes go to the trash page.
        page_index = (first // page_size).clamp(max=block_table.shape[1] - 1)
        page = torch.where(closes, block_table[sel.slot, page_index], 0)
        return sel, window, page, (first % page_size) // m

    def entry_rows(self, idx: StepIndex, pool: torch.Tensor, block_table: torch.Tensor,
                   entries: torch.Tensor) -> torch.Tensor:
        """Entry numbers `entries` [T, J] of each token's request (−1 = none) → their rows in the flat
        pool [pages · P/m, C] (−1 kept)."""
        m, per_page = self.rate, pool.shape[1]
        first = entries.clamp(min=0) * m  # [T, J] first token of each entry
        pages = idx.pages(block_table).gather(1, first // (per_page * m))
        return torch.where(entries >= 0, pages * per_page + (first % (per_page * m)) // m, -1)

    def visible_rows(self, idx: StepIndex, pool: torch.Tensor, block_table: torch.Tensor):
        """Every entry slot of each token's request below the batch's context bound (all of them when
        it is unknown) → (pool rows [T, E], −1 where entry w ≥ visible (window not closed by t);
        visible [T]). The same for every layer of one rate and page layout: built once per forward."""
        m = self.rate

        def make():
            slots = block_table.shape[1] * pool.shape[1]
            if idx.context:  # visible ≤ (position + 1) // m < context // m + 1
                slots = min(slots, idx.context // m + 1)
            visible = (idx.positions + 1) // m  # [T]
            numbers = torch.arange(slots, device=pool.device).expand(visible.shape[0], slots)  # [T, E]
            seen = torch.where(numbers < visible.unsqueeze(-1), numbers, -1)
            return self.entry_rows(idx, pool, block_table, seen), visible

        return idx.memo(("visible entry rows", m, pool.shape[1]), make)

    def dense_entries(self, x: torch.Tensor) -> torch.Tensor:
        """All entries of full sequences starting at position 0: x [B, S, D] → [B, S // m, C]."""
        b, s, _ = x.shape
        n = s // self.rate
        kv, gate = self.project(x[:, : n * self.rate])
        kv, gate = kv.unflatten(1, (n, self.rate)), gate.unflatten(1, (n, self.rate))  # [B, n, m, ·]
        prev_kv = prev_gate = None
        if self.overlap:
            prev_kv = torch.cat([torch.zeros_like(kv[:, :1]), kv[:, :-1]], dim=1)
            prev_gate = torch.cat([torch.full_like(gate[:, :1], float("-inf")), gate[:, :-1]], dim=1)
        window = torch.arange(n, device=x.device).expand(b, n)
        return self.pool(kv, gate, prev_kv, prev_gate, window)


class IndexerScorer(nn.Module):
    """Per-head weights of the indexer score (HF keeps this projection in its own module)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.weights_proj = linear(config.hidden_size, config.index_n_heads)
        self.scaling = config.index_n_heads ** -0.5

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., D] → [..., Hi] fp32."""
        return self.weights_proj(x).float() * self.scaling


class Indexer(Compressor):
    """The lightning indexer: a CSA-style compressor at width di plus its own queries and scorer."""

    def __init__(self, config: ModelConfig, rotary: RotaryTable):
        super().__init__(config, config.index_head_dim, config.csa_rate, overlap=True, rotary=rotary)
        self.num_heads = config.index_n_heads
        self.q_b_proj = linear(config.q_lora_rank, config.index_n_heads * config.index_head_dim)
        self.scorer = IndexerScorer(config)

    def queries(self, q_lat: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """q_lat [..., q_lora_rank] → roped indexer queries [..., Hi, di] (no norm)."""
        q = self.q_b_proj(q_lat).unflatten(-1, (self.num_heads, self.width))
        return apply_rope(q, cos.unsqueeze(-2), sin.unsqueeze(-2))


class Attention(nn.Module):
    """One V4 attention layer (sliding, CSA or HCA)."""

    def __init__(self, config: ModelConfig, layer_type: str, parallel: Parallel = Parallel.single()):
        super().__init__()
        self.layer_type, self.kernels = layer_type, config.kernels
        # Tensor parallel: this rank's heads and their output groups; the K=V latent is replicated (one KV head).
        self.parallel = parallel
        self.num_heads, self.head_dim = parallel.part(config.num_heads, "num_heads"), config.head_dim
        self.window = config.sliding_window
        self.eps = config.rms_norm_eps
        self.scale = config.head_dim ** -0.5
        # Sliding layers use the main table; CSA/HCA layers use the compress table everywhere
        # (queries, window keys, entries, indexer).
        rope = config.main_rope if layer_type == "sliding" else config.compress_rope
        self.rotary = RotaryTable(rope, config.rope_head_dim)

        self.q_a_proj = linear(config.hidden_size, config.q_lora_rank)
        self.q_a_norm = RMSNorm(config.q_lora_rank, config.rms_norm_eps)
        self.q_b_proj = linear(config.q_lora_rank, self.num_heads * config.head_dim)
        self.kv_proj = linear(config.hidden_size, config.head_dim)
        self.kv_norm = RMSNorm(config.head_dim, config.rms_norm_eps)
        self.o_groups = parallel.part(config.o_groups, "o_groups")
        self.o_a_proj = GroupedLinear(config.num_heads * config.head_dim // config.o_groups,
                                      self.o_groups * config.o_lora_rank, self.o_groups)
        self.o_b_proj = linear(self.o_groups * config.o_lora_rank, config.hidden_size)
        self.sinks = nn.Parameter(torch.empty(self.num_heads))

        self.compressor: Compressor | None = None
        if layer_type == "csa":
            self.compressor = Compressor(config, config.head_dim, config.csa_rate, overlap=True, rotary=self.rotary)
            self.compressor.indexer = Indexer(config, self.rotary)
            self.index_topk = config.index_topk
        elif layer_type == "hca":
            self.compressor = Compressor(config, config.head_dim, config.hca_rate, overlap=False, rotary=self.rotary)

    # ---------------------------------------------------------------- shared pieces
    def project_q(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """x [..., D] → q [..., H, hd] (per-head unweighted RMSNorm, roped) and q_lat [..., q_lora_rank]."""
        q_lat = self.q_a_norm(self.q_a_proj(x))
        q = unweighted_rms_norm(self.q_b_proj(q_lat).unflatten(-1, (self.num_heads, self.head_dim)), self.eps)
        return apply_rope(q, cos.unsqueeze(-2), sin.unsqueeze(-2)), q_lat

    def project_kv(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x [..., D] → the shared K=V row [..., hd], normed and roped."""
        return apply_rope(self.kv_norm(self.kv_proj(x)), cos, sin)

    def project_out(self, o: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """o [..., H, hd] → [..., D]: undo the value rotation at the query position, grouped projection
        (with tensor parallelism: this rank's heads and groups, then the sum of every rank's part)."""
        o = apply_rope(o, cos.unsqueeze(-2), sin.unsqueeze(-2), inverse=True)
        grouped = o.flatten(-2).unflatten(-1, (self.o_groups, -1))  # [..., G, H·hd/G]
        return self.parallel.sum(self.o_b_proj(self.o_a_proj(grouped).flatten(-2)))

    def topk_entries(self, x: torch.Tensor, q_lat: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                     index_keys: torch.Tensor, visible: torch.Tensor, rows: torch.Tensor | None = None
                     ) -> torch.Tensor:
        """CSA: the indexer's top-k entries per query → int64 [B, T, k] over the W index keys, −1 = none.
        index_keys [B, W, di], or a pool [P, di] with `rows` [B, W] naming each entry's row (ops.indexer)."""
        indexer = self.compressor.indexer
        _, top = ops.indexer_select(indexer.queries(q_lat, cos, sin), index_keys, indexer.scorer(x), visible,
                                    self.index_topk, rows=rows, kernels=self.kernels)
        return top

    def select_entries(self, x: torch.Tensor, q_lat: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                       index_keys: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
        """CSA: the indexer's top-k entries per query → bool [B, T, W] over the W index keys."""
        top = self.topk_entries(x, q_lat, cos, sin, index_keys, visible)  # [B, T, k], -1 = none
        chosen = torch.zeros(*top.shape[:-1], index_keys.shape[1] + 1, dtype=torch.bool, device=x.device)
        chosen.scatter_(-1, torch.where(top < 0, index_keys.shape[1], top), True)
        return chosen[..., :-1]

    def indexer_targets(self, x, q, q_lat, cos, sin, entries, visible) -> "IndexerTargets":
        """What the indexer is distilled toward (training): its scores from DETACHED trunk inputs, so
        the distillation loss trains the indexer only, and the main attention's mass over the causal
        entries (softmax over entries per head, averaged over heads; no gradient)."""
        indexer = self.compressor.indexer
        xd, q_lat_d = x.detach(), q_lat.detach()
        scores = ops.indexer_scores_ref(indexer.queries(q_lat_d, cos, sin), indexer.dense_entries(xd),
                                        indexer.scorer(xd))  # [B, S, W]
        causal = torch.arange(entries.shape[1], device=x.device) < visible.unsqueeze(-1)  # [B, S, W]
        with torch.no_grad():
            logits = torch.einsum("bshd,bwd->bshw", q.float(), entries.float()) * self.scale
            mass = logits.masked_fill(~causal.unsqueeze(2), float("-inf")).softmax(-1).nan_to_num(0.0).mean(2)
        return IndexerTargets(scores=scores, mass=mass, causal=causal)

    # ---------------------------------------------------------------- cached ragged forward
    def forward_cached(self, x: torch.Tensor, idx: StepIndex, cache: LayerCache, block_table: torch.Tensor,
                       dummy_slot: int) -> torch.Tensor:
        """Flat tokens x [T, D] of a ragged batch → [T, D], reading and extending `cache`.

        Keys per query: the W window positions (committed ones from the ring, the request's new
        ones from the batch) and, for CSA/HCA, the compressed entries visible at its position,
        including entries whose window closed earlier in this same forward. No key is copied: the
        attention reads them by index from [window ring ; this forward's rows ; entry pool].
        """
        pos = idx.positions
        cos, sin = self.rotary(pos)
        q, q_lat = self.project_q(x, cos, sin)
        ring = cache.window  # [slots, Wc, hd]
        kv = self.project_kv(x, cos, sin).to(ring.dtype)  # [T, hd]
        parts = [ring.flatten(0, 1), kv]
        index = idx.memo(("window rows", self.window, ring.shape), lambda: self.window_rows(idx, ring))
        if self.compressor is not None:
            comp = self.compressor
            comp.write_closing_entries(x, idx, cache.raw_kv, cache.raw_gate, cache.entries, block_table, dummy_slot)
            if self.layer_type == "csa":
                # The indexer scores every visible entry; the attention reads only the k it chose.
                indexer = comp.indexer
                indexer.write_closing_entries(x, idx, cache.idx_raw_kv, cache.idx_raw_gate, cache.index_keys,
                                              block_table, dummy_slot)
                key_rows, visible = indexer.visible_rows(idx, cache.index_keys, block_table)  # [T, E], [T]
                top = self.topk_entries(x.unsqueeze(1), q_lat.unsqueeze(1), cos.unsqueeze(1), sin.unsqueeze(1),
                                        cache.index_keys.flatten(0, 1), visible.unsqueeze(1), key_rows)[:, 0]  # [T, k]
                rows = comp.entry_rows(idx, cache.entries, block_table, top)
            else:
                rows = comp.visible_rows(idx, cache.entries, block_table)[0]  # [T, E]
            start = ring.shape[0] * ring.shape[1] + kv.shape[0]  # the entry pool's first row in the index
            parts.append(cache.entries.flatten(0, 1))
            index = torch.cat([index, torch.where(rows >= 0, rows + start, -1)], dim=-1)
        o = ops.sparse_sink_attention(q.to(ring.dtype), parts, index, self.sinks, self.scale,
                                      kernels=self.kernels).to(x.dtype)
        idx.ring_write(ring, kv, dummy_slot)
        return self.project_out(o, cos, sin)

    def window_rows(self, idx: StepIndex, ring: torch.Tensor) -> torch.Tensor:
        """Rows of each query's window keys in [ring ; this forward's rows] → [T, W] (causal) or
        [T, 2W−1] (block-bidirectional: also the request's later new tokens), −1 where masked."""
        pos = idx.positions
        win = pos.unsqueeze(-1) - (self.window - 1) + torch.arange(self.window, device=pos.device)  # [T, W]
        allowed = win >= 0
        if not idx.causal:
            later = pos.unsqueeze(-1) + 1 + torch.arange(self.window - 1, device=pos.device)
            win = torch.cat([win, later], dim=-1)
            allowed = torch.cat([allowed, later < idx.chunk_end.unsqueeze(-1)], dim=-1)
        return torch.where(allowed, idx.key_rows(win, ring), -1)

    # ---------------------------------------------------------------- dense forward
    def forward(self, x: torch.Tensor, collect: list | None = None) -> torch.Tensor:
        """Full sequences from position 0, no cache: x [B, S, D] → [B, S, D].

        `collect` (training, CSA layers): appends `IndexerTargets` for the indexer's distillation."""
        if collect is not None and self.parallel.world > 1:  # the attention mass averages over ALL heads
            raise NotImplementedError("collect (indexer distillation targets) needs a single-process model, "
                                      f"not parallel world {self.parallel.world}")
        b, s, _ = x.shape
        pos = torch.arange(s, device=x.device)
        cos, sin = self.rotary(pos.expand(b, s))
        q, q_lat = self.project_q(x, cos, sin)
        keys = self.project_kv(x, cos, sin)  # [B, S, hd]
        # Window: query t reads tokens t−W < j ≤ t.
        allowed = (pos[None, :] <= pos[:, None]) & (pos[None, :] > pos[:, None] - self.window)
        allowed = allowed.expand(b, s, s)
        if self.compressor is not None:
            entries = self.compressor.dense_entries(x)  # [B, W, hd]
            visible = ((pos + 1) // self.compressor.rate).expand(b, s)  # entries whose window closed
            if self.layer_type == "csa":
                index_keys = self.compressor.indexer.dense_entries(x)
                entry_allowed = self.select_entries(x, q_lat, cos, sin, index_keys, visible)
                if collect is not None:
                    collect.append(self.indexer_targets(x, q, q_lat, cos, sin, entries, visible))
            else:
                entry_allowed = torch.arange(entries.shape[1], device=x.device) < visible.unsqueeze(-1)
            keys = torch.cat([keys, entries], dim=1)
            allowed = torch.cat([allowed, entry_allowed], dim=-1)
        o = ops.sink_attention(q, keys, allowed, self.sinks, self.scale, kernels=self.kernels)
        return self.project_out(o, cos, sin)
