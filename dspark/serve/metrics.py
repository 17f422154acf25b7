"""The server's counters in the Prometheus text format (version 0.0.4), no client library needed.

Names follow vLLM's where one exists (`dspark:` for `vllm:`), so dashboards carry over: requests
running / waiting, prompt and generation tokens, time to first token and inter-token latency
histograms, and the speculative figures (drafts proposed and accepted, accepted per position,
mean τ, verify tokens per request per round). Updated by the engine thread, read by /metrics; one
lock guards both.
"""

from __future__ import annotations

import bisect
import math
import threading

from dspark.decode.stats import RequestStats

# Latency buckets in seconds (vLLM's TTFT / ITL buckets, trimmed).
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4,
               0.5, 0.75, 1.0, 2.5, 5.0)
VERIFY_BUCKETS = (1, 2, 3, 4, 5, 6, 8, 10, 12, 16, 24, 32)


class Histogram:
    def __init__(self, buckets: tuple[float, ...]):
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)  # the last one is +Inf
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value
        self.count += 1

    def lines(self, name: str) -> list[str]:
        out, total = [], 0
        for bound, n in zip([*self.buckets, math.inf], self.counts):
            total += n
            le = "+Inf" if bound == math.inf else repr(float(bound))
            out.append(f'{name}_bucket{{le="{le}"}} {total}')
        return out + [f"{name}_sum {self.sum!r}", f"{name}_count {self.count}"]


class Metrics:
    """Every figure /metrics shows. `observe_*` are called by the engine thread, `render` by the app."""

    def __init__(self, model_name: str, method: str):
        self.lock = threading.Lock()
        self.labels = f'model_name="{model_name}",method="{method}"'
        self.prompt_tokens = 0
        self.generation_tokens = 0  # tokens delivered to clients (what their usage adds up to)
        self.finished: dict[str, int] = {}  # finish_reason → requests
        self.rejected = 0  # 429: over the queue bound
        self.ttft = Histogram(TTFT_BUCKETS)
        self.itl = Histogram(ITL_BUCKETS)
        self.e2e = Histogram(TTFT_BUCKETS)
        # speculative decoding, per decode round of each request
        self.rounds = 0
        self.draft_tokens = 0  # drafts proposed (verified) over all rounds
        self.accepted_tokens = 0
        self.emitted_tokens = 0  # accepted + bonus: τ = emitted / rounds
        self.proposed_per_pos: list[int] = []
        self.accepted_per_pos: list[int] = []
        self.verify_tokens = Histogram(VERIFY_BUCKETS)  # ℓ + 1 rows verified per request per round

    def observe_rounds(self, stats: RequestStats, seen: int) -> None:
        """Rounds `seen:` of a request's stats (the ones new since its last output)."""
        with self.lock:
            for proposed, accepted, emitted in zip(stats.proposal_lens[seen:], stats.accepted[seen:],
                                                   stats.emitted[seen:]):
                self.rounds += 1
                self.draft_tokens += proposed
                self.accepted_tokens += accepted
                self.emitted_tokens += emitted
                self.verify_tokens.observe(proposed + 1)
                while len(self.proposed_per_pos) < proposed:
                    self.proposed_per_pos.append(0)
                    self.accepted_per_pos.append(0)
                for i in range(proposed):
                    self.proposed_per_pos[i] += 1
                    self.accepted_per_pos[i] += accepted > i

    def observe_tokens(self, n: int, ttft: float | None, itl: float | None) -> None:
        with self.lock:
            self.generation_tokens += n
            if ttft is not None:
                self.ttft.observe(ttft)
            if itl is not None:
                self.itl.observe(itl)

    def observe_admitted(self, prompt_tokens: int) -> None:
        with self.lock:
            self.prompt_tokens += prompt_tokens

    def observe_finished(self, reason: str, e2e: float) -> None:
        with self.lock:
            self.finished[reason] = self.finished.get(reason, 0) + 1
            self.e2e.observe(e2e)

    def observe_rejected(self) -> None:
        with self.lock:
            self.rejected += 1

    def render(self, running: int, waiting: int, free_pages: int, total_pages: int) -> str:
        lab = self.labels
        out: list[str] = []

        def metric(name: str, kind: str, help: str, samples: list[str]) -> None:
            out.extend([f"# HELP {name} {help}", f"# TYPE {name} {kind}", *samples])

        def scalar(name: str, kind: str, help: str, value, extra: str = "") -> None:
            metric(name, kind, help, [f"{name}{{{lab}{extra}}} {value}"])

        def hist(name: str, help: str, h: Histogram) -> None:
            metric(name, "histogram", help, [_label(line, lab) for line in h.lines(name)])

        with self.lock:
            scalar("dspark:num_requests_running", "gauge", "Requests in engine slots.", running)
            scalar("dspark:num_requests_waiting", "gauge", "Requests queued for a slot or KV pages.", waiting)
            scalar("dspark:kv_cache_free_pages", "gauge", "Free KV cache pages.", free_pages)
            scalar("dspark:kv_cache_total_pages", "gauge", "KV cache pages in all.", total_pages)
            scalar("dspark:prompt_tokens_total", "counter", "Prompt tokens admitted.", self.prompt_tokens)
            scalar("dspark:generation_tokens_total", "counter", "Generated tokens delivered to clients.",
                   self.generation_tokens)
            metric("dspark:request_success_total", "counter", "Finished requests by finish reason.",
                   [f'dspark:request_success_total{{{lab},finished_reason="{r}"}} {n}'
                    for r, n in sorted(self.finished.items())])
            scalar("dspark:request_rejected_total", "counter", "Requests refused with 429 (queue full).",
                   self.rejected)
            hist("dspark:time_to_first_token_seconds", "Time to first token.", self.ttft)
            hist("dspark:inter_token_latency_seconds", "Time between a request's token deliveries (per round).",
                 self.itl)
            hist("dspark:e2e_request_latency_seconds", "Request latency, arrival to finish.", self.e2e)
            scalar("dspark:spec_decode_num_drafts", "counter", "Decode rounds (one draft + verify per request).",
                   self.rounds)
            scalar("dspark:spec_decode_num_draft_tokens", "counter", "Draft tokens proposed (verified).",
                   self.draft_tokens)
            scalar("dspark:spec_decode_num_accepted_tokens", "counter", "Draft tokens accepted.", self.accepted_tokens)
            scalar("dspark:spec_decode_num_emitted_tokens", "counter",
                   "Tokens emitted by decode rounds (bonus included).", self.emitted_tokens)
            metric("dspark:spec_decode_num_accepted_tokens_per_pos", "counter",
                   "Drafts accepted at each position (0-based).",
                   [f'dspark:spec_decode_num_accepted_tokens_per_pos{{{lab},position="{i}"}} {n}'
                    for i, n in enumerate(self.accepted_per_pos)])
            metric("dspark:spec_decode_num_proposed_tokens_per_pos", "counter",
                   "Drafts proposed at each position (0-based).",
                   [f'dspark:spec_decode_num_proposed_tokens_per_pos{{{lab},position="{i}"}} {n}'
                    for i, n in enumerate(self.proposed_per_pos)])
            scalar("dspark:spec_decode_mean_tau", "gauge", "Mean tokens per decode round, bonus included.",
                   self.emitted_tokens / self.rounds if self.rounds else 0.0)
            hist("dspark:spec_decode_verify_tokens_per_round", "Rows verified per request per round (drafts + 1).",
                 self.verify_tokens)
        return "\n".join(out) + "\n"


def _label(line: str, labels: str) -> str:
    """Put the common labels into one histogram sample line."""
    name, _, value = line.rpartition(" ")
    if name.endswith("}"):
        return f"{name[:-1]},{labels}}} {value}"
    return f"{name}{{{labels}}} {value}"


def parse(text: str) -> dict[str, float]:
    """Prometheus text → {sample name with its labels: value} (tests, tools)."""
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out
