"""The flat ragged batch every cached forward takes (architecture.md §2), and its per-step index maps.

Layouts: T flat tokens, R request rows (+1 dummy row that owns padding), J gathered positions.

    input_ids [T], positions [T]   token ids and absolute positions (row r's tokens sit at
                                   cache_len[r], cache_len[r]+1, ... in flat order)
    token_row [T]                  request row of each token; padding tokens carry the dummy row R
    valid     [T] bool             False for padding: routes to no expert, writes only the trash slot
    slot      [R+1]                cache slot of each row (the dummy row has the cache's dummy slot)
    cache_len [R+1]                committed tokens of the row before this batch
    new_start [R+1], new_len [R+1] where the row's new tokens sit in the flat batch
    logits_rows [L]                flat indices whose fp32 logits are returned
    context                        host int: every position in the batch is below it (0 = unknown).
                                   Layers read compressed entries only up to it, not up to the cache's
                                   capacity: a short request must not pay for max_seq_len. Bucketed to
                                   powers of two (`context_bucket`) so few distinct shapes arise.

Everything here is a tensor computed without host syncs, so one step can be captured in a graph.
Two constructors: `Batch.build` on the host from token lists (prefill chunks, tests), and
`Batch.from_lengths` on the device from per-row token counts (verify rounds, the MTP chain).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dspark.ops._launch import next_pow2


def context_bucket(n: int) -> int:
    """A static bound ≥ n on positions + 1: the next power of two, at least 64."""
    return max(64, next_pow2(n))


@dataclass(frozen=True)
class Batch:
    input_ids: torch.Tensor
    positions: torch.Tensor
    token_row: torch.Tensor
    valid: torch.Tensor
    slot: torch.Tensor
    cache_len: torch.Tensor
    new_start: torch.Tensor
    new_len: torch.Tensor
    logits_rows: torch.Tensor
    # True: each request's new tokens are causal (prefill, chain verify). False: bidirectional
    # among the request's new tokens (draft blocks).
    causal: bool = True
    context: int = 0

    @property
    def num_tokens(self) -> int:
        return self.input_ids.shape[0]

    @classmethod
    def build(cls, requests: list[tuple[int, int, list[int]]], *, dummy_slot: int, pad_to: int | None = None,
              logits: str | list[int] = "last", causal: bool = True, device="cpu") -> "Batch":
        """Host-side constructor. `requests` = [(slot, cache_len, new token ids)], in row order.

        `pad_to` appends padding tokens (dummy row, dummy slot) up to a bucket size. `logits` is
        "last" (each request's last new token), "all" (every real token) or explicit flat indices.
        """
        ids, pos, rows, starts, lens = [], [], [], [], []
        for r, (slot, cache_len, tokens) in enumerate(requests):
            starts.append(len(ids))
            lens.append(len(tokens))
            ids.extend(tokens)
            pos.extend(range(cache_len, cache_len + len(tokens)))
            rows.extend([r] * len(tokens))
        real = len(ids)
        if pad_to is not None:
            if pad_to < real:
                raise ValueError(f"pad_to {pad_to} is smaller than the {real} tokens of the batch")
            pad = pad_to - real
            ids.extend([0] * pad)
            pos.extend(range(pad))
            rows.extend([len(requests)] * pad)
        n_pad = len(ids) - real
        slots = [s for s, _, _ in requests] + [dummy_slot]
        cache_lens = [c for _, c, _ in requests] + [0]
        starts.append(real)
        lens.append(n_pad)
        if logits == "last":
            logits_rows = [s + n - 1 for s, n in zip(starts[:-1], lens[:-1]) if n > 0]
        elif logits == "all":
            logits_rows = list(range(real))
        else:
            logits_rows = list(logits)

        def t(values, dtype=torch.long):
            return torch.tensor(values, dtype=dtype, device=device)

        return cls(input_ids=t(ids), positions=t(pos), token_row=t(rows), valid=t([True] * real + [False] * n_pad,
                   torch.bool), slot=t(slots), cache_len=t(cache_lens), new_start=t(starts), new_len=t(lens),
                   logits_rows=t(logits_rows), causal=causal, context=context_bucket(max(pos, default=0) + 1))

    @classmethod
    def from_lengths(cls, slot: torch.Tensor, cache_len: torch.Tensor, lengths: torch.Tensor, bucket: int,
                      dummy_slot: int, context: int = 0) -> tuple["Batch", torch.Tensor]:
        """Device-side constructor without host syncs: row r holds `lengths[r]` new tokens at positions
        cache_len[r], cache_len[r] + 1, ...; rows in order, padding (dummy row and slot) up to `bucket`
        flat tokens. Returns (batch with zero input ids and logits for every flat row, column [T] of each
        token within its row). Σ lengths must not exceed `bucket` (the caller's static bound)."""
        dev = cache_len.device
        ends = lengths.cumsum(0)
        start = ends - lengths
        total = ends[-1:]
        flat = torch.arange(bucket, device=dev)
        row = torch.searchsorted(ends, flat, right=True)  # row of each flat token; r for padding
        valid = flat < total
        col = flat - torch.cat([start, total])[row]
        cache = torch.cat([cache_len, cache_len.new_zeros(1)])
        batch = cls(input_ids=torch.zeros_like(flat), positions=cache[row] + col, token_row=row, valid=valid,
                    slot=torch.cat([slot, slot.new_tensor([dummy_slot])]), cache_len=cache,
                    new_start=torch.cat([start, total]), new_len=torch.cat([lengths, bucket - total]), logits_rows=flat,
                    context=context)
        return batch, torch.where(valid, col, 0)


class StepIndex:
    """Per-token views of the batch and the index rules shared by every layer of one forward.

    A position p of token i's request is read from the batch when p ≥ cache_len (the request's own
    new tokens: a chunk's tokens read each other from the batch, never from a ring too small for
    them) and from the request's ring slot p mod capacity otherwise.

    Index tensors that every layer of a kind builds alike (the window's key rows, the block table's
    rows per token, the visible HCA entries) are made once per forward through `memo`.
    """

    def __init__(self, batch: Batch):
        self.batch = batch
        row = batch.token_row
        self.positions = batch.positions
        self.valid = batch.valid
        self.slot = batch.slot[row]  # [T]
        self.cache_len = batch.cache_len[row]
        self.new_start = batch.new_start[row]
        self.chunk_end = self.cache_len + batch.new_len[row]  # position after the row's last new token
        self.causal = batch.causal
        self.context = batch.context
        self._memo: dict = {}

    def memo(self, key, make):
        """make() on the first call with `key` in this forward, the same tensor afterwards."""
        if key not in self._memo:
            self._memo[key] = make()
        return self._memo[key]

    def select(self, order: torch.Tensor) -> "StepIndex":
        """The same rules for the tokens `order` [n] of this forward only (rows of the batch stay where
        they are: `gather` still reads this forward's rows by their flat index)."""
        sub = object.__new__(StepIndex)
        sub.batch, sub.causal, sub.context, sub._memo = self.batch, self.causal, self.context, {}
        for name in ("positions", "valid", "slot", "cache_len", "new_start", "chunk_end"):
            setattr(sub, name, getattr(self, name)[order])
        return sub

    def pages(self, block_table: torch.Tensor) -> torch.Tensor:
        """block_table [slots, pages_per_slot] → each token's request's pages [T, pages_per_slot]."""
        return self.memo("pages", lambda: block_table[self.slot])

    def _locate(self, pos: torch.Tensor, capacity: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """pos [T, J] → (from the batch? [T, J], batch row, ring row within the slot)."""
        p = pos.clamp(min=0)
        in_batch = p >= self.cache_len.unsqueeze(-1)
        return in_batch, self.new_start.unsqueeze(-1) + p - self.cache_len.unsqueeze(-1), p % capacity

    def gather(self, batch_rows: torch.Tensor, ring: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """Rows at positions `pos` [T, J] of each token's request → [T, J, C].

        batch_rows [T, C] are this forward's rows; ring [slots, capacity, C] the committed ones.
        Positions outside [0, chunk_end) return arbitrary finite rows: callers mask them.
        """
        in_batch, flat, ring_row = self._locate(pos, ring.shape[1])
        from_ring = ring[self.slot.unsqueeze(-1), ring_row]
        return torch.where(in_batch.unsqueeze(-1), batch_rows[flat.clamp(0, batch_rows.shape[0] - 1)].to(ring.dtype),
                           from_ring)

    def key_rows(self, pos: torch.Tensor, ring: torch.Tensor) -> torch.Tensor:
        """Where `gather` would read positions `pos` [T, J], as rows of the pool [ring rows flattened ;
        this forward's T rows] → int64 [T, J] (no copy of either; callers mask positions they may not read)."""
        in_batch, flat, ring_row = self._locate(pos, ring.shape[1])
        ring_rows = ring.shape[0] * ring.shape[1]
        from_batch = ring_rows + flat.clamp(0, self.batch.num_tokens - 1)
        return torch.where(in_batch, from_batch, self.slot.unsqueeze(-1) * ring.shape[1] + ring_row)

    def ring_write(self, ring: torch.Tensor, rows: torch.Tensor, dummy_slot: int) -> None:
        """Store this forward's rows [T, C] at ring[slot, position mod capacity].

        Only the last `capacity` tokens of each request write (earlier ones would be overwritten in
        the same scatter, which has no defined order); padding writes the dummy slot.
        """
        cap = ring.shape[1]
        keep = self.valid & (self.positions >= self.chunk_end - cap)
        slot = torch.where(keep, self.slot, dummy_slot)
        ring[slot, self.positions % cap] = rows.to(ring.dtype)
