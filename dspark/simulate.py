"""The serving simulator: full decoding rounds composed from a cost table and acceptance traces.

A GPU is lent rarely, so throughput curves are composed on the CPU (performance.md): measured
per-component costs (verify forward per token bucket, drafting per request count) plus acceptance
traces recorded on real text. C users decode at once (closed loop); each round every user takes
the next round of its trace — the accepted count a under full-block verification and the draft's
confidences — the scheduler picks verify lengths ℓ from those confidences, the user emits
min(a, ℓ) + 1 tokens (chain verification accepts a prefix, so a shorter verify keeps min(a, ℓ)),
and the round costs draft(C) + verify(Σ(ℓ+1)).

Outputs per method and concurrency: aggregate tokens/s, per-user tokens/s, and the verify budget
per request (mean ℓ + 1).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from dspark.decode import schedule as schedulers


@dataclass
class TraceRound:
    accepted: int  # drafts accepted when the full block was verified
    confidence: list[float] | None = None  # calibrated confidences c_k of the block (None: no head)


@dataclass
class CostTable:
    """Milliseconds per verify forward by tokens in flight, and per drafting pass by requests."""

    verify_ms: dict[int, float]
    draft_ms: dict[str, dict[int, float]] = field(default_factory=dict)  # method → requests → ms
    device: str = "unknown"

    @staticmethod
    def _interp(points: dict[int, float], x: int) -> float:
        """Linear between measured points, flat below the first, the last slope above the last."""
        if not points:
            return 0.0
        keys = sorted(points)
        if x <= keys[0] or len(keys) == 1:
            return points[keys[0]] if x <= keys[0] else points[keys[0]] * x / keys[0]
        if x >= keys[-1]:
            a, b = keys[-2], keys[-1]
            return points[b] + (points[b] - points[a]) / (b - a) * (x - b)
        hi = next(k for k in keys if k >= x)
        lo = max(k for k in keys if k <= x)
        return points[lo] if hi == lo else points[lo] + (points[hi] - points[lo]) * (x - lo) / (hi - lo)

    def verify(self, tokens: int) -> float:
        return self._interp(self.verify_ms, tokens)

    def draft(self, method: str, requests: int) -> float:
        return self._interp(self.draft_ms.get(method, {}), requests)

    def sps(self, max_tokens: int) -> list[float]:
        """The schedulers' SPS table (steps/s per verify batch size) implied by this cost table."""
        return [0.0] + [1000.0 / self.verify(b) for b in range(1, max_tokens + 1)]

    @classmethod
    def load(cls, path: str | Path) -> "CostTable":
        d = json.loads(Path(path).read_text())
        if not d.get("verify_ms"):
            raise ValueError(f"{path}: the cost table has no verify_ms entries")
        return cls({int(k): float(v) for k, v in d["verify_ms"].items()},
                   {m: {int(k): float(v) for k, v in t.items()} for m, t in d.get("draft_ms", {}).items()},
                   d.get("device", "unknown"))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps({"device": self.device, "verify_ms": self.verify_ms,
                                          "draft_ms": self.draft_ms}, indent=1) + "\n")


@dataclass
class Policy:
    """How a method verifies: a fixed length, or a scheduler over the draft's confidences."""

    name: str
    draft_cost: str  # key into CostTable.draft_ms ("" = no drafting, e.g. ar)
    gamma: int
    scheduler: str = "fixed"
    threshold: float = 0.5
    max_verify: int | None = None  # e.g. MTP-1 verifies 1


def _lengths(policy: Policy, rounds: list[TraceRound], sps: torch.Tensor, capacity: int | None) -> list[int]:
    r = len(rounds)
    room = torch.full((r,), policy.max_verify if policy.max_verify is not None else policy.gamma)
    if policy.scheduler == "fixed":
        return room.tolist()
    conf = torch.tensor([t.confidence for t in rounds], dtype=torch.float32)
    active = torch.ones(r, dtype=torch.bool)
    if policy.scheduler == "threshold-slot":
        return schedulers.threshold_slot(conf, room, policy.threshold).tolist()
    if policy.scheduler == "threshold-survival":
        return schedulers.threshold_survival(conf, room, policy.threshold).tolist()
    if policy.scheduler == "hardware":
        return schedulers.hardware(conf, room, active, sps).tolist()
    if policy.scheduler == "async":
        k = capacity if capacity is not None else int(room.sum())
        return schedulers.async_topk(conf, room, torch.tensor(k)).tolist()
    raise ValueError(f"unknown scheduler {policy.scheduler!r}")


def simulate(traces: list[list[TraceRound]], cost: CostTable, policy: Policy, concurrency: int, *,
             rounds: int = 200, seed: int = 0) -> dict[str, float]:
    """Closed-loop serving of `concurrency` users replaying `traces` (each user starts at a random
    trace and moves to the next when one ends) → aggregate and per-user tokens/s, verify budget."""
    if not traces or not any(traces):
        raise ValueError("no trace rounds to replay")
    if policy.scheduler != "fixed" and any(t.confidence is None for tr in traces for t in tr):
        raise ValueError(f"scheduler {policy.scheduler!r} needs traces with confidences")
    g = torch.Generator().manual_seed(seed)
    cursors = [[int(torch.randint(0, len(traces), (1,), generator=g)), 0] for _ in range(concurrency)]
    sps = torch.tensor(cost.sps(concurrency * (policy.gamma + 1)))
    capacities: list[int] = []
    tokens = total_ms = budget = 0.0
    per_user = [0.0] * concurrency
    for _ in range(rounds):
        current = []
        for c in cursors:
            while c[1] >= len(traces[c[0]]):
                c[0], c[1] = (c[0] + 1) % len(traces), 0
            current.append(traces[c[0]][c[1]])
            c[1] += 1
        lengths = _lengths(policy, current, sps, capacities[-2] if len(capacities) >= 2 else None)
        if policy.scheduler == "async":
            conf = torch.tensor([t.confidence for t in current], dtype=torch.float32)
            room = torch.full((concurrency,), policy.gamma)
            capacities.append(int(schedulers.capacity(conf, room, torch.ones(concurrency, dtype=torch.bool), sps)))
        emitted = [min(t.accepted, ell) + 1 for t, ell in zip(current, lengths)]
        ms = cost.draft(policy.draft_cost, concurrency) + cost.verify(sum(ell + 1 for ell in lengths))
        total_ms += ms
        tokens += sum(emitted)
        budget += sum(ell + 1 for ell in lengths)
        for i, e in enumerate(emitted):
            per_user[i] += e
    seconds = total_ms / 1000.0
    return {"concurrency": concurrency, "aggregate_tps": tokens / seconds, "per_user_tps": tokens / seconds / concurrency,
            "tau": tokens / (rounds * concurrency), "verify_budget": budget / (rounds * concurrency),
            "round_ms": total_ms / rounds}


def sweep(traces: dict[str, list[list[TraceRound]]], cost: CostTable, policies: list[Policy],
          concurrencies: list[int], **kw) -> list[dict]:
    """Every policy at every concurrency; `traces` maps a policy's draft_cost (method) to its traces."""
    rows = []
    for policy in policies:
        key = policy.draft_cost or "ar"
        for c in concurrencies:
            row = simulate(traces[key], cost, policy, c, **kw)
            rows.append({"policy": policy.name, **row})
    return rows


def plot(rows: list[dict], path_throughput: str | Path, path_budget: str | Path) -> None:
    """The paper's Fig. 7 (aggregate vs per-user tokens/s) and Fig. 8 (verify budget vs concurrency)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = sorted({r["policy"] for r in rows}, key=lambda n: [r["policy"] for r in rows].index(n))
    for path, x, y, xl, yl, logx in ((path_throughput, "per_user_tps", "aggregate_tps", "tokens/s per user",
                                      "aggregate tokens/s", False),
                                     (path_budget, "concurrency", "verify_budget", "concurrency",
                                      "verified tokens per request", True)):
        fig, ax = plt.subplots(figsize=(5.2, 3.6))
        for n in names:
            pts = [r for r in rows if r["policy"] == n]
            ax.plot([p[x] for p in pts], [p[y] for p in pts], "o-", ms=3, label=n)
        if logx:
            ax.set_xscale("log", base=2)
        ax.set_xlabel(xl)
        ax.set_ylabel(yl)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)


def load_traces(path: str | Path, method: str, temperature: float | None = None, domain: str | None = None,
                sts: list[float] | None = None) -> list[list[TraceRound]]:
    """Rounds of one method from an evaluation trace file (JSONL: method, temperature, domain, request,
    proposal_len, accepted, confidence_logits), grouped by request; confidences through σ(z / T_sts)."""
    groups: dict[tuple, list[TraceRound]] = {}
    for line in Path(path).read_text().splitlines():
        rec = json.loads(line)
        if rec["method"] != method or (temperature is not None and rec["temperature"] != temperature) or (
                domain is not None and rec.get("domain") != domain):
            continue
        z = rec.get("confidence_logits")
        conf = None
        if z is not None:
            temps = sts or [1.0] * len(z)
            conf = [1.0 / (1.0 + math.exp(-v / t)) for v, t in zip(z, temps)]
        groups.setdefault((rec.get("domain"), rec.get("temperature"), rec["request"]), []).append(
            TraceRound(int(rec["accepted"]), conf))
    if not groups:
        raise ValueError(f"{path}: no trace rounds for method {method!r}")
    return list(groups.values())
