"""SPS(B): verify steps per second with B tokens in flight, profiled on the engine's own forward.

The hardware-aware schedulers trade expected accepted tokens against this curve (dspark.md §7.1),
so it must be measured on the real implementation, not assumed (performance.md). `profile_sps`
times `forward_batch` on a private cache: R requests with a committed context verify B tokens in
total; the median of a few repeats after a warm-up. Results are cached per model, device and
torch version under ~/.cache/dspark (or $DSPARK_CACHE); `table` fills every B in [0, Bmax] by
linear interpolation of the step time between profiled buckets. `engine_sps` is what a caller
passes as `EngineConfig.sps` for an engine of a given batch and draft length; the engine itself
never profiles.
"""

from __future__ import annotations

import hashlib
import json
import os
import statistics
import time
from pathlib import Path

import torch

from dspark.model.batch import Batch


def default_buckets(max_tokens: int) -> list[int]:
    """1, 2, 3, 4, 6, 8, 12, 16, ... up to `max_tokens` (and including it)."""
    out, b = [], 1
    while b < max_tokens:
        out.append(b)
        b = b + 1 if b < 4 else (b * 3 // 2 if (b & (b - 1)) == 0 else b * 4 // 3)
    return sorted(set(out + [max_tokens]))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def profile_sps(target, buckets: list[int], *, requests: int = 8, context: int = 64, repeats: int = 5,
                warmup: int = 1, clock=time.perf_counter) -> dict[int, float]:
    """Steps/s of one verify forward per bucket of B total tokens (split evenly over up to `requests`).
    `clock` is wall time by default; a CPU benchmark on a shared machine may pass `time.thread_time`."""
    if not buckets or min(buckets) < 1:
        raise ValueError(f"buckets must be positive token counts, got {buckets}")
    cfg = target.config
    device = target.lm_head.weight.device
    r = max(1, min(requests, max(buckets)))
    per_request = -(-max(buckets) // r)
    cache = target.new_cache(max_batch=r, max_seq_len=context + per_request + 1, max_provisional=per_request + 1)
    g = torch.Generator().manual_seed(0)
    for slot in range(r):
        cache.admit(slot, context + per_request + 1)
    prefill = Batch.build([(s, 0, torch.randint(0, cfg.vocab_size, (context,), generator=g).tolist())
                           for s in range(r)], dummy_slot=cache.dummy_slot, device=device)
    target.forward_batch(prefill, cache)
    out = {}
    for b in buckets:
        counts = [b // r + (1 if s < b % r else 0) for s in range(r)]
        batch = Batch.build([(s, context, torch.randint(0, cfg.vocab_size, (n,), generator=g).tolist())
                             for s, n in enumerate(counts) if n > 0], dummy_slot=cache.dummy_slot, logits="all",
                            device=device)
        times = []
        for i in range(warmup + repeats):
            _sync(device)
            start = clock()
            target.forward_batch(batch, cache)
            _sync(device)
            if i >= warmup:
                times.append(clock() - start)
        out[b] = 1.0 / statistics.median(times)
    return out


def table(profile: dict[int, float], max_tokens: int) -> list[float]:
    """SPS for every B in 0..max_tokens (index B), step time interpolated linearly between buckets
    and held flat past the ends; SPS(0) = 0 (no step)."""
    points = sorted((b, 1.0 / s) for b, s in profile.items())
    if not points:
        raise ValueError("empty SPS profile")
    out = [0.0]
    for b in range(1, max_tokens + 1):
        lo = max((p for p in points if p[0] <= b), default=points[0])
        hi = min((p for p in points if p[0] >= b), default=points[-1])
        t = lo[1] if hi[0] == lo[0] else lo[1] + (hi[1] - lo[1]) * (b - lo[0]) / (hi[0] - lo[0])
        out.append(1.0 / t)
    return out


def cache_path(target, buckets: list[int], requests: int, context: int) -> Path:
    device = target.lm_head.weight.device
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    key = json.dumps([repr(target.config), str(target.dtype), name, torch.__version__, torch.get_num_threads(),
                      buckets, requests, context])
    root = Path(os.environ.get("DSPARK_CACHE", Path.home() / ".cache" / "dspark"))
    return root / f"sps-{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"


def cached_profile(target, buckets: list[int], *, requests: int = 8, context: int = 64, refresh: bool = False,
                   **kw) -> dict[int, float]:
    """`profile_sps`, reusing an earlier result for the same model, device, dtype and threads."""
    path = cache_path(target, buckets, requests, context)
    if path.exists() and not refresh:
        return {int(k): v for k, v in json.loads(path.read_text())["sps"].items()}
    result = profile_sps(target, buckets, requests=requests, context=context, **kw)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"sps": result}, indent=1) + "\n")
    return result


def engine_sps(target, max_batch: int, num_draft_tokens: int, *, refresh: bool = False) -> tuple[float, ...]:
    """The SPS table (index B = verify tokens, 0..max_batch·(γ+1)) for an engine of `max_batch` slots
    drafting γ tokens: profiled on `target` (cached per model, device and threads)."""
    top = max_batch * (num_draft_tokens + 1)
    return tuple(table(cached_profile(target, default_buckets(top), requests=max_batch, refresh=refresh), top))
