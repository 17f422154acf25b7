"""Target caches, allocated once, with commit and rollback by length: the page pool and admission
every cache shares (`PagedCache`), the V4 target's (`TargetCache`, with its MTP) and the dense HF
targets' paged K/V (`DenseCache`).

Dense targets keep K and V of every position in pages, sliding layers too (the window is applied
when attending), so there is nothing to roll back: rows past the committed length are overwritten
by the next forward before any query reads them.

What each V4 layer keeps per request (deepseek_v4.md §11.3; everything is a pure function of the
committed tokens, so rolling back is only "forget everything at or past the committed length"):

    window        ring [slots, Wc, hd]       K=V rows keyed by position mod Wc (every layer)
    raw_kv/gate   ring [slots, Rc, s·C]      compressor projections, gate WITHOUT the position bias
    idx_raw_*     ring [slots, Rc, 2·di]     the indexer compressor's projections (CSA)
    entries       pool [pages, P/m, hd]      compressed entries, entry w of a request at page
                                             block_table[slot, w·m // P], row (w·m mod P) / m
    index_keys    pool [pages, P/m, di]      indexer keys (CSA), addressed like the entries

Ring capacities leave room for the tokens one forward may roll back (`max_provisional`): a draft
token written at position p overwrites position p − capacity, which must lie before anything the
next forward reads (window: W−1 rows back; CSA raw: 2m−1; HCA raw: m−1).

Entries are written when their window's last token is processed, provisional or not; a query
reads entry w only when w < floor((t+1)/m), i.e. when the closing token is committed or in the
same forward (where it was just rewritten). Stale provisional rows are unreachable; tests poison
them to prove it. Slot `dummy_slot` and page 0 belong to nobody: padding and masked writes land
there and no request ever reads them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from dspark.config import DenseConfig, ModelConfig


class CacheFullError(RuntimeError):
    """A request cannot be admitted: not enough free pages or slots (nothing was changed)."""


@dataclass
class LayerCache:
    window: torch.Tensor
    raw_kv: torch.Tensor | None = None
    raw_gate: torch.Tensor | None = None
    idx_raw_kv: torch.Tensor | None = None
    idx_raw_gate: torch.Tensor | None = None
    entries: torch.Tensor | None = None
    index_keys: torch.Tensor | None = None

    def tensors(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in vars(self).items() if v is not None}


def ring_capacity(reach_back: int, max_provisional: int) -> int:
    """Ring rows needed when reads reach `reach_back` positions before a forward's first token."""
    return reach_back + max_provisional


class PagedCache:
    """The page pool, the block table and admission, shared by every target's cache.

    max_batch slots (+ one dummy slot), `page_size` tokens per page. Pages come from a memory
    budget (bytes) or default to max_batch full-length requests. Page allocation happens at
    admission (`admit`), so running out of memory is refused up front, never mid-run. Subclasses
    say what a page and a slot cost (`_bytes_per_page`, `_fixed_bytes`) and allocate their tensors
    after this constructor.
    """

    def __init__(self, *, max_batch: int, max_seq_len: int, max_position_embeddings: int, max_provisional: int,
                 page_size: int | None, page_unit: int, memory_budget: int | None, dtype: torch.dtype,
                 device: torch.device | str):
        default_page = page_unit * max(1, math.ceil(64 / page_unit))
        page_size = page_size or default_page
        if page_size % page_unit:
            raise ValueError(f"page_size {page_size} must be a multiple of every compression rate (lcm {page_unit})")
        if page_size > max(default_page, page_unit * math.ceil(max_seq_len / page_unit)):
            raise ValueError(f"page_size {page_size} is larger than a whole request ({max_seq_len} positions)")
        if max_seq_len > max_position_embeddings:
            raise ValueError(f"max_seq_len {max_seq_len} exceeds max_position_embeddings {max_position_embeddings}")
        self.max_batch, self.max_seq_len, self.page_size = max_batch, max_seq_len, page_size
        self.max_provisional = max_provisional
        self.pages_per_slot = math.ceil(max_seq_len / page_size)
        self.dummy_slot = max_batch
        self.dtype, self.device = dtype, torch.device(device)

        slots = max_batch + 1
        per_page = self._bytes_per_page()
        fixed = self._fixed_bytes(slots)
        if memory_budget is None:
            num_pages = max_batch * self.pages_per_slot
        else:
            num_pages = (memory_budget - fixed) // max(per_page, 1)
            if num_pages < self.pages_per_slot:
                raise ValueError(
                    f"memory budget {memory_budget} B holds {max(num_pages, 0)} pages after {fixed} B of per-slot "
                    f"rings; one full-length request needs {self.pages_per_slot} pages of {per_page} B")
            # Pages beyond what every slot at full length could hold would never be used.
            num_pages = min(num_pages, max_batch * self.pages_per_slot)
        self.num_pages = int(num_pages) + 1  # page 0 is the trash page
        self.block_table = torch.zeros(slots, self.pages_per_slot, dtype=torch.long, device=self.device)
        self._free_pages = list(range(self.num_pages - 1, 0, -1))
        self._slot_pages: dict[int, list[int]] = {}

    def _bytes_per_page(self) -> int:
        raise NotImplementedError

    def _fixed_bytes(self, slots: int) -> int:
        raise NotImplementedError

    def _zeros(self, *shape):
        return torch.zeros(*shape, dtype=self.dtype, device=self.device)

    # ---------------------------------------------------------------- admission (host side)
    @property
    def free_pages(self) -> int:
        return len(self._free_pages)

    def pages_for(self, num_tokens: int) -> int:
        return math.ceil(num_tokens / self.page_size)

    def admit(self, slot: int, max_tokens: int) -> None:
        """Reserve pages for a request that may grow to `max_tokens` committed + provisional tokens."""
        if not 0 <= slot < self.max_batch:
            raise CacheFullError(f"slot {slot} outside 0..{self.max_batch - 1}")
        if slot in self._slot_pages:
            raise CacheFullError(f"slot {slot} is already in use")
        if max_tokens > self.max_seq_len:
            raise CacheFullError(f"request needs {max_tokens} tokens; the cache holds at most {self.max_seq_len} "
                                 "per request")
        need = self.pages_for(max_tokens)
        if need > len(self._free_pages):
            raise CacheFullError(f"request needs {need} pages of {self.page_size} tokens; only "
                                 f"{len(self._free_pages)} are free")
        pages = [self._free_pages.pop() for _ in range(need)]
        self._slot_pages[slot] = pages
        row = torch.zeros(self.pages_per_slot, dtype=torch.long)
        row[:need] = torch.tensor(pages)
        self.block_table[slot] = row.to(self.device)

    def release(self, slot: int) -> None:
        """Return a slot's pages; its rows are garbage from now on and are never read."""
        self._free_pages.extend(reversed(self._slot_pages.pop(slot, [])))
        self.block_table[slot] = 0


class TargetCache(PagedCache):
    """All cache state of a V4 target: per-slot rings, paged entry pools (and the page pool of
    `PagedCache`)."""

    def __init__(self, config: ModelConfig, *, max_batch: int, max_seq_len: int, max_provisional: int = 8,
                 page_size: int | None = None, memory_budget: int | None = None, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu", with_mtp: bool | None = None):
        rates = [config.compress_rate(i) for i in range(config.num_layers) if config.layer_types[i] != "sliding"]
        self.config = config
        self._with_mtp = config.mtp_kind == "mtp" if with_mtp is None else with_mtp
        # No read reaches back past a request's first position: a window longer than max_seq_len
        # (a config's claim, not a need) is capped there instead of sizing the rings by it.
        self.window_capacity = ring_capacity(min(config.sliding_window, max_seq_len) - 1, max_provisional)
        super().__init__(max_batch=max_batch, max_seq_len=max_seq_len,
                         max_position_embeddings=config.max_position_embeddings, max_provisional=max_provisional,
                         page_size=page_size, page_unit=math.lcm(*rates) if rates else 1,
                         memory_budget=memory_budget, dtype=dtype, device=device)
        slots = max_batch + 1
        self.layers = [self._layer(i, slots) for i in range(config.num_layers)]
        self.mtp = [self._window_only(slots) for _ in range(config.num_mtp_layers)] if self._with_mtp else []

    # ---------------------------------------------------------------- allocation
    def _window_only(self, slots: int) -> LayerCache:
        return LayerCache(window=self._zeros(slots, self.window_capacity, self.config.head_dim))

    def _layer(self, i: int, slots: int) -> LayerCache:
        cfg, kind = self.config, self.config.layer_types[i]
        cache = self._window_only(slots)
        if kind == "sliding":
            return cache
        m = cfg.compress_rate(i)
        series = 2 if kind == "csa" else 1
        raw_cap = ring_capacity(series * m - 1, self.max_provisional)
        rows = self.page_size // m
        cache.raw_kv = self._zeros(slots, raw_cap, series * cfg.head_dim)
        cache.raw_gate = self._zeros(slots, raw_cap, series * cfg.head_dim)
        cache.entries = self._zeros(self.num_pages, rows, cfg.head_dim)
        if kind == "csa":
            cache.idx_raw_kv = self._zeros(slots, raw_cap, 2 * cfg.index_head_dim)
            cache.idx_raw_gate = self._zeros(slots, raw_cap, 2 * cfg.index_head_dim)
            cache.index_keys = self._zeros(self.num_pages, rows, cfg.index_head_dim)
        return cache

    def _bytes_per_page(self) -> int:
        cfg, elem = self.config, torch.finfo(self.dtype).bits // 8
        total = 0
        for i, kind in enumerate(cfg.layer_types):
            if kind != "sliding":
                rows = self.page_size // cfg.compress_rate(i)
                total += rows * (cfg.head_dim + (cfg.index_head_dim if kind == "csa" else 0)) * elem
        return total

    def _fixed_bytes(self, slots: int, with_mtp: bool | None = None) -> int:
        cfg, elem = self.config, torch.finfo(self.dtype).bits // 8
        mtp = self._with_mtp if with_mtp is None else with_mtp
        total = 0
        for i, kind in enumerate(cfg.layer_types):
            total += self.window_capacity * cfg.head_dim
            if kind != "sliding":
                m, series = cfg.compress_rate(i), (2 if kind == "csa" else 1)
                cap = ring_capacity(series * m - 1, self.max_provisional)
                total += 2 * cap * series * cfg.head_dim + (2 * cap * 2 * cfg.index_head_dim if kind == "csa" else 0)
        total += (cfg.num_mtp_layers if mtp else 0) * self.window_capacity * cfg.head_dim
        return total * slots * elem

    # ---------------------------------------------------------------- tests and debugging
    def poison_uncommitted(self, slot: int, committed: int, value: float = float("nan")) -> None:
        """Overwrite every row of `slot` that is not a function of its first `committed` tokens.

        Every ring row outside the reach of the next forward, and entries w ≥ floor(committed/m). A correct
        forward after rollback never reads them (tests use this to prove there are no stale reads).
        """
        cfg = self.config

        def ring(t: torch.Tensor | None):
            # A ring of capacity reach + max_provisional must keep the `reach` rows of positions
            # [committed − reach, committed); every other row is fair game.
            if t is not None:
                for p in range(committed, committed + self.max_provisional):
                    t[slot, p % t.shape[1]] = value

        for i, layer in enumerate(self.layers + self.mtp):
            for t in (layer.window, layer.raw_kv, layer.raw_gate, layer.idx_raw_kv, layer.idx_raw_gate):
                ring(t)
            if layer.entries is None:
                continue
            m = cfg.compress_rate(i)
            rows = self.page_size // m
            for w in range(committed // m, self.pages_per_slot * rows):
                page, row = int(self.block_table[slot, (w * m) // self.page_size]), (w * m % self.page_size) // m
                if page == 0:
                    continue
                layer.entries[page, row] = value
                if layer.index_keys is not None:
                    layer.index_keys[page, row] = value


@dataclass
class DenseLayerCache:
    k: torch.Tensor  # [pages, page_size, Hkv, hd]
    v: torch.Tensor  # [pages, page_size, Hkv, hd]


class DenseCache(PagedCache):
    """K/V pages of a dense target: position p of a request lives at page block_table[slot, p // P],
    row p mod P, in every layer (per-layer head dims and KV heads may differ: Gemma 4)."""

    def __init__(self, config: DenseConfig, *, max_batch: int, max_seq_len: int, max_provisional: int = 8,
                 page_size: int | None = None, memory_budget: int | None = None, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu", with_mtp: bool = False):
        if with_mtp:
            raise ValueError(f"a {config.family} target has no MTP module (with_mtp=True)")
        self.config = config
        super().__init__(max_batch=max_batch, max_seq_len=max_seq_len,
                         max_position_embeddings=config.max_position_embeddings, max_provisional=max_provisional,
                         page_size=page_size, page_unit=1, memory_budget=memory_budget, dtype=dtype, device=device)
        self.layers = [DenseLayerCache(*(self._zeros(self.num_pages, self.page_size, config.layer_kv_heads(i),
                                                     config.layer_head_dim(i)) for _ in range(2)))
                       for i in range(config.num_layers)]
        self.mtp: list = []

    def _bytes_per_page(self) -> int:
        cfg, elem = self.config, torch.finfo(self.dtype).bits // 8
        return sum(2 * self.page_size * cfg.layer_kv_heads(i) * cfg.layer_head_dim(i) * elem
                   for i in range(cfg.num_layers))

    def _fixed_bytes(self, slots: int) -> int:
        return 0

    def poison_uncommitted(self, slot: int, committed: int, value: float = float("nan")) -> None:
        """Overwrite every K/V row of `slot` at positions ≥ `committed` (tests: no stale reads)."""
        for p in range(committed, self.pages_per_slot * self.page_size):
            page = int(self.block_table[slot, p // self.page_size])
            if page:
                for layer in self.layers:
                    layer.k[page, p % self.page_size] = value
                    layer.v[page, p % self.page_size] = value
