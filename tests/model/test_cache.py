"""Cached ragged forwards equal the dense full forward, through chunked prefill, verify and rollback.

The harness keeps, per request, a true token sequence and its dense full-forward logits. Each
step sends one flat batch holding every request's next action: a prefill chunk (all true tokens)
or a verify chunk (an anchor and drafts, of which a prefix is true and the rest wrong, then rolled
back to the true prefix). Every logits row whose inputs are all true must equal the full forward.
After each rollback the cache rows past the committed length are poisoned with NaN, so any stale
read shows up as NaN.
"""

from __future__ import annotations

import functools

import pytest
import torch
from hypothesis import given, strategies as st

from dspark.config import ModelConfig
from dspark.model.batch import Batch
from dspark.model.cache import CacheFullError, TargetCache
from dspark.model.mtp import mtp_forward, mtp_forward_batch
from dspark.model.target import DeepseekV4
from tests.compare import assert_close

ATOL = 1e-4  # the bound; observed ~5e-6
MAX_LEN = 112


@functools.lru_cache(maxsize=None)
def tiny_model(seed: int = 0) -> DeepseekV4:
    return DeepseekV4.random(ModelConfig.tiny(), seed=seed).eval()


class Harness:
    def __init__(self, model: DeepseekV4, lengths: list[int], seed: int, max_batch: int = 4, max_seq_len=MAX_LEN,
                 **cache_kw):
        self.model, self.config = model, model.config
        g = torch.Generator().manual_seed(seed)
        self.seqs = [torch.randint(2, self.config.vocab_size, (n,), generator=g) for n in lengths]
        with torch.no_grad():
            self.full = [model(s.unsqueeze(0))[0] for s in self.seqs]
        self.cache = TargetCache(self.config, max_batch=max_batch, max_seq_len=max_seq_len, **cache_kw)
        # Requests take non-adjacent slots so slot arithmetic mistakes cannot hide.
        self.slots = [3, 0, 2, 1][: len(lengths)]
        for slot, n in zip(self.slots, lengths):
            self.cache.admit(slot, n)
        self.committed = [0] * len(lengths)
        self.rows_checked = 0
        self.gen = g

    def wrong_token(self, true: int) -> int:
        t = int(torch.randint(2, self.config.vocab_size - 1, (1,), generator=self.gen))
        return t if t != true else t + 1

    def step(self, actions: dict[int, tuple[int, int]], pad: int = 0):
        """actions: request → (chunk length, number of true tokens at its head; the rest are wrong).

        Commits the true head (all of a prefill chunk)."""
        requests, plans = [], []
        for r, (n, true) in actions.items():
            start = self.committed[r]
            n = min(n, len(self.seqs[r]) - start)
            true = min(true, n)
            if n <= 0:
                continue
            tokens = self.seqs[r][start:start + n].tolist()
            tokens[true:] = [self.wrong_token(t) for t in tokens[true:]]
            requests.append((self.slots[r], start, tokens))
            plans.append((r, start, n, true))
        if not requests:
            return
        real = sum(len(t) for _, _, t in requests)
        batch = Batch.build(requests, dummy_slot=self.cache.dummy_slot, logits="all", pad_to=real + pad)
        with torch.no_grad():
            out = self.model.forward_batch(batch, self.cache)
        offset = 0
        for r, start, n, true in plans:
            got = out.logits[offset:offset + true]
            assert_close(got, self.full[r][start:start + true], atol=ATOL, rtol=0,
                         what=f"request {r} positions {start}..{start + true - 1}")
            self.rows_checked += true
            offset += n
            self.committed[r] = start + true
            self.cache.poison_uncommitted(self.slots[r], self.committed[r])

    def prefill(self, r: int, upto: int, chunk: int = 7):
        while self.committed[r] < upto:
            n = min(chunk, upto - self.committed[r])
            self.step({r: (n, n)})


actions = st.tuples(st.sampled_from(["prefill", "verify"]), st.integers(1, 8), st.integers(0, 8))


@given(lengths=st.lists(st.integers(20, MAX_LEN), min_size=1, max_size=3), seed=st.integers(0, 2**16),
       schedule=st.lists(st.lists(actions, min_size=3, max_size=3), min_size=1, max_size=60),
       pad=st.integers(0, 3))
def test_random_schedules_match_full_forward(lengths, seed, schedule, pad):
    h = Harness(tiny_model(), lengths, seed)
    for step in schedule:
        acts = {}
        for r, (kind, n, accepted) in enumerate(step[: len(lengths)]):
            if kind == "prefill":
                acts[r] = (n + 8, n + 8)  # prefill chunks of 9..16 tokens, all committed
            else:
                acts[r] = (n, 1 + min(accepted, n - 1))  # anchor + drafts: the anchor is always kept
        h.step(acts, pad=pad)
    # Finish every request, so the whole sequence is checked.
    for r in range(len(lengths)):
        h.prefill(r, len(h.seqs[r]), chunk=16)
    assert h.rows_checked >= sum(lengths)


@pytest.mark.parametrize("rate", [4, 16])
@pytest.mark.parametrize("delta", [-1, 0, 1])
def test_rollback_around_window_boundaries(rate, delta):
    """Roll back to k·m−1, k·m and k·m+1 after drafts that closed windows provisionally."""
    target = 3 * rate + delta + (16 if rate == 4 else 0)
    h = Harness(tiny_model(), [MAX_LEN], seed=rate + delta)
    h.prefill(0, target - 2)
    h.step({0: (8, 2)})  # 2 true, 6 wrong: closes windows with wrong tokens, then rolls back
    assert h.committed[0] == target
    h.step({0: (5, 5)})
    h.prefill(0, MAX_LEN)


def test_hca_window_closes_inside_verify_chunk():
    h = Harness(tiny_model(), [MAX_LEN], seed=5)
    h.prefill(0, 44)
    h.step({0: (8, 8)})  # positions 44..51 close HCA window 2 (token 47) and CSA windows, all accepted
    h.step({0: (8, 3)})  # 52..59: a CSA window closes on an accepted token, HCA's next on a wrong one
    h.step({0: (8, 1)})  # verify that accepts zero drafts
    h.prefill(0, MAX_LEN)


def test_every_request_closing_its_most_windows():
    """Entries are pooled only for the tokens that close a window, selected under the static bound
    T // m + R. Three requests at position 15 ≡ −1 (mod 4 and 16) send 17 tokens each: 5 CSA and 2 HCA
    windows close per request, exactly the bound (51 // 4 + 3 = 15, 51 // 16 + 3 = 6), with padding."""
    h = Harness(tiny_model(), [60, 60, 60], seed=6)
    for r in range(3):
        h.prefill(r, 15)
    h.step({0: (17, 17), 1: (17, 17), 2: (17, 17)}, pad=3)
    h.step({0: (5, 5), 1: (9, 2), 2: (16, 16)})
    for r in range(3):
        h.prefill(r, 60)


def test_chunked_prefill_equals_one_pass():
    h = Harness(tiny_model(), [100, 100], seed=9, max_batch=4)
    h.step({0: (100, 100)})  # one pass: chunk longer than every ring
    h.prefill(1, 100, chunk=13)


def test_requests_never_affect_each_other():
    """A request's logits are the same alone and next to others, whose slots are poisoned."""
    model = tiny_model()
    alone = Harness(model, [60], seed=3)
    alone.prefill(0, 60, chunk=9)
    crowd = Harness(model, [60, 90, 35], seed=3)
    crowd.seqs[0] = alone.seqs[0]
    crowd.full[0] = alone.full[0]
    for start in range(0, 90, 9):
        crowd.step({0: (9, 9), 1: (9, 5), 2: (9, 9)}, pad=2)
        for other in (1, 2):  # poison the neighbours' uncommitted rows every step
            crowd.cache.poison_uncommitted(crowd.slots[other], crowd.committed[other])
    assert crowd.committed[0] == 60


def test_padding_touches_no_expert():
    model = tiny_model()
    cache = TargetCache(model.config, max_batch=2, max_seq_len=64)
    cache.admit(0, 64)
    ids = list(range(5, 17))
    load_padded = torch.zeros(model.config.num_layers, model.config.n_routed_experts, dtype=torch.long)
    padded = Batch.build([(0, 0, ids)], dummy_slot=cache.dummy_slot, pad_to=32)
    with torch.no_grad():
        model.forward_batch(padded, cache, expert_load=load_padded)
    k = model.config.num_experts_per_tok
    assert load_padded.sum(dim=1).tolist() == [len(ids) * k] * model.config.num_layers
    # Padding wrote only the dummy slot: the real slot's rings match an unpadded run.
    cache2 = TargetCache(model.config, max_batch=2, max_seq_len=64)
    cache2.admit(0, 64)
    with torch.no_grad():
        model.forward_batch(Batch.build([(0, 0, ids)], dummy_slot=cache2.dummy_slot), cache2)
    for a, b in zip(cache.layers, cache2.layers):
        assert_close(a.window[0], b.window[0], what="window ring of the real slot")


def test_admission_refuses_when_pages_run_out():
    config = ModelConfig.tiny()
    cache = TargetCache(config, max_batch=4, max_seq_len=128, page_size=32,
                        memory_budget=None)
    per_request = cache.pages_for(128)
    budget_pages = 5
    small = TargetCache(config, max_batch=4, max_seq_len=128, page_size=32,
                        memory_budget=cache._fixed_bytes(5, None) + budget_pages * cache._bytes_per_page())
    assert small.free_pages == budget_pages
    small.admit(0, 128)  # 4 pages
    before = small.block_table.clone()
    with pytest.raises(CacheFullError, match="needs 4 pages"):
        small.admit(1, 128)
    assert torch.equal(small.block_table, before) and small.free_pages == budget_pages - per_request
    small.admit(1, 30)  # one page still fits
    with pytest.raises(CacheFullError, match="at most 128"):
        small.admit(2, 129)
    with pytest.raises(CacheFullError, match="already in use"):
        small.admit(0, 10)
    small.release(0)
    small.admit(2, 128)
    with pytest.raises(ValueError, match="memory budget"):
        TargetCache(config, max_batch=4, max_seq_len=128, page_size=32, memory_budget=1000)


def test_mtp_cached_matches_dense():
    model = tiny_model()
    ids = torch.randint(2, model.config.vocab_size, (1, 80), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        streams = model.run(ids).streams[0]  # [S, N, D]
        dense, _ = mtp_forward(model, streams[None, :-1], ids[:, 1:])
    cache = TargetCache(model.config, max_batch=2, max_seq_len=MAX_LEN)
    cache.admit(1, 80)
    start = 0
    for n, keep in [(20, 20), (7, 3), (9, 9), (8, 1), (30, 30), (5, 5), (8, 8)]:
        n = min(n, 79 - start)
        if n <= 0:
            break
        tokens = ids[0, 1 + start:1 + start + n].tolist()
        tokens[keep:] = [(t + 1) % model.config.vocab_size for t in tokens[keep:]]
        batch = Batch.build([(1, start, tokens)], dummy_slot=cache.dummy_slot, logits="all")
        with torch.no_grad():
            logits, _ = mtp_forward_batch(model, streams[start:start + n], batch, cache)
        assert_close(logits[:keep], dense[0, start:start + keep], atol=ATOL, rtol=0, what=f"mtp at {start}")
        start += min(keep, n)
        cache.poison_uncommitted(1, start)


def test_entry_reads_stop_at_the_context_bound():
    """A short request in a cache sized for long ones reads entries only below the batch's context
    bound, and gets what reading every entry slot gives (up to summation order over the masked keys)."""
    import dataclasses

    h = Harness(tiny_model(), [60], seed=5, max_seq_len=1024)
    h.prefill(0, 40)
    batch = Batch.build([(h.slots[0], 40, h.seqs[0][40:48].tolist())], dummy_slot=h.cache.dummy_slot, logits="all")
    assert batch.context == 64  # 48 positions, bucketed: 17 entry slots read instead of 256
    with torch.no_grad():
        bounded = h.model.forward_batch(batch, h.cache).logits
        h.cache.poison_uncommitted(h.slots[0], 40)
        unbounded = h.model.forward_batch(dataclasses.replace(batch, context=0), h.cache).logits
    assert_close(bounded, unbounded, atol=1e-5, rtol=0, what="bounded vs unbounded reads")
    assert_close(bounded, h.full[0][40:48], atol=ATOL, rtol=0, what="bounded reads")


@pytest.fixture
def launches(monkeypatch):
    """Counts Triton launches per ops module (the real launch still runs)."""
    import collections
    import importlib
    import pkgutil

    import dspark.ops
    from dspark.ops import _launch

    if not _launch.HAS_TRITON:
        pytest.skip("needs triton")
    counts = collections.Counter()
    for info in pkgutil.iter_modules(dspark.ops.__path__):
        module = importlib.import_module(f"dspark.ops.{info.name}")
        if hasattr(module, "launch") and info.name != "_launch":
            def counted(kernel, grid, *args, name=info.name, **kwargs):
                counts[name] += 1
                return _launch.launch(kernel, grid, *args, **kwargs)

            monkeypatch.setattr(module, "launch", counted)
    return counts


def test_cached_forward_on_the_kernels(launches):
    """`kernels="triton"` runs every kernel (the interpreter on CPU): the cached forward (paged attention over
    [ring ; new rows ; entry pool], indexer, compressor, router, grouped MoE, mHC) equals the reference full
    forward through prefill, verify and rollback."""
    h = Harness(tiny_model(), [40, 29], seed=3)  # the full forwards run on the references
    assert not launches
    h.model = DeepseekV4.random(ModelConfig.tiny().replace(kernels="triton"), seed=0).eval()  # same weights
    h.step({0: (16, 16), 1: (9, 9)}, pad=2)
    h.step({0: (5, 2), 1: (6, 6)})
    h.step({0: (16, 16), 1: (4, 1)}, pad=1)
    h.prefill(0, 40, chunk=13)
    h.prefill(1, 29, chunk=13)
    assert h.rows_checked == 69
    assert all(launches[name] for name in ("attention", "indexer", "compressor", "moe", "mhc")), launches
