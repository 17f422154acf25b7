"""Profile decode rounds of the real engine: a Chrome trace, a per-kernel table and the idle gaps.

C requests decode together; after their prefill and a few warm-up rounds, N decode rounds run under
the PyTorch profiler, each inside a `dspark.round` range. Outputs in OUT:

    trace.json    Chrome trace (chrome://tracing, https://ui.perfetto.dev)
    kernels.md    per kernel (CUDA) or per top-level op (CPU): calls, total and mean µs, share of the rounds
    summary.json  the settings, per-round wall ms, busy and idle µs, the largest gaps and what surrounds them

Idle gaps are what a CUDA graph removes: on CUDA, the time between consecutive kernels on the device
inside a round (launch overhead, host work, syncs); on CPU, the time between consecutive top-level ops
of the decoding thread (Python and dispatch overhead). Nsight Systems sees the same rounds as NVTX
ranges when run with `--nsys` (see NSYS_RECIPE).
"""

from __future__ import annotations

import json
from contextlib import closing
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from dspark.config import SamplingParams
from dspark.decode.generate import run
from dspark.llm import LLM

ROUND = "dspark.round"
NSYS_RECIPE = ("nsys profile --trace=cuda,nvtx,osrt --capture-range=cudaProfilerApi --capture-range-end=stop "
               "-o OUT/nsys dspark profile --nsys --device cuda [other options]")
PROMPTS = ("def fibonacci(n):\n", "import os\nimport sys\n\n\ndef main(", "The following options are available:\n",
           "class Config:\n    \"\"\"", "NAME\n       ls - list directory contents\n")


@dataclass(frozen=True)
class ProfileConfig:
    model: str = "nano"  # a checkpoint directory or a preset name (see dspark.llm.LLM)
    method: str = "dspark"
    scheduler: str = "fixed"
    num_draft_tokens: int | None = None
    concurrency: int = 4
    rounds: int = 20
    warmup: int = 3
    temperature: float = 1.0
    device: str = "cpu"
    dtype: str = "fp32"
    seed: int = 0
    nsys: bool = False  # NVTX ranges + cudaProfilerStart/Stop instead of the PyTorch profiler
    cuda_graphs: bool = False  # decode rounds replayed from CUDA graphs

    def validate(self) -> None:
        for name in ("concurrency", "rounds"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.warmup < 0:
            raise ValueError(f"warmup must be >= 0, got {self.warmup}")
        for flag in ("nsys", "cuda_graphs"):
            if getattr(self, flag) and not self.device.startswith("cuda"):
                raise ValueError(f"--{flag.replace('_', '-')} needs CUDA: use it with --device cuda")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _decode_round(steps) -> None:
    """One step of the host loop that must be a decode round (prefill is over and every request still runs)."""
    outputs = next(steps, None)
    if outputs is None or any(o.finished for o in outputs):
        raise RuntimeError("a request finished before the profiled rounds ended; this is a bug in the profiler")


def _gaps(spans: list[tuple[float, float, str]], rounds: list[tuple[float, float]]) -> tuple[float, list[dict]]:
    """Idle µs between consecutive spans (start, end, name) inside each round, and every gap found."""
    idle, found = 0.0, []
    for r0, r1 in rounds:
        inside = sorted(s for s in spans if s[0] >= r0 and s[1] <= r1)
        end, prev = None, None
        for start, stop, name in inside:
            if end is not None and start > end:
                idle += start - end
                found.append({"us": start - end, "after": prev, "before": name})
            if end is None or stop > end:
                end, prev = stop, name
    return idle, found


def profile(config: ProfileConfig, out: str | Path, *, progress: bool = True) -> dict:
    """Run the profile and write trace.json, kernels.md and summary.json to `out`; returns the summary."""
    config.validate()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    llm = LLM(config.model, method=config.method, num_draft_tokens=config.num_draft_tokens, dtype=config.dtype,
              device=config.device, max_batch=config.concurrency, scheduler=config.scheduler,
              cuda_graphs=config.cuda_graphs)
    engine = llm.engine
    device = engine.target.lm_head.weight.device
    gamma = engine.drafter.num_draft_tokens
    # Enough tokens that no request can finish inside the profiled rounds; no stop tokens.
    budget = (config.warmup + config.rounds + 2) * (gamma + 1)
    prompts = [llm.tokenizer.encode(PROMPTS[i % len(PROMPTS)]) for i in range(config.concurrency)]
    params = [SamplingParams(temperature=config.temperature, seed=config.seed + i, max_tokens=budget)
              for i in range(config.concurrency)]
    with closing(run(engine, prompts, params)) as steps:
        while engine.prefilling:
            next(steps)
        for _ in range(config.warmup):
            _decode_round(steps)
        _sync(device)
        return _profile_rounds(config, out, engine, steps, device, progress)


def _profile_rounds(config: ProfileConfig, out: Path, engine, steps, device, progress: bool) -> dict:

    say = (lambda m: print(m, flush=True)) if progress else (lambda m: None)
    say(f"profiling {config.rounds} rounds of {config.method} at concurrency {config.concurrency} on {device}")
    wall = []
    if config.nsys:
        torch.cuda.profiler.start()
        for _ in range(config.rounds):
            torch.cuda.nvtx.range_push(ROUND)
            start = time.perf_counter()
            _decode_round(steps)
            _sync(device)
            wall.append(1000 * (time.perf_counter() - start))
            torch.cuda.nvtx.range_pop()
        torch.cuda.profiler.stop()
        summary = {"config": asdict(config), "device": str(device), "round_ms": wall,
                   "median_round_ms": statistics.median(wall), "nsys": NSYS_RECIPE}
        (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
        return summary

    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile as torch_profile, record_function

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch_profile(activities=activities) as prof:
        for _ in range(config.rounds):
            start = time.perf_counter()
            with record_function(ROUND):
                _decode_round(steps)
                _sync(device)
            wall.append(1000 * (time.perf_counter() - start))
    prof.export_chrome_trace(str(out / "trace.json"))

    events = list(prof.events())
    round_events = [e for e in events if e.name == ROUND and e.device_type == DeviceType.CPU]
    rounds = [(e.time_range.start, e.time_range.end) for e in round_events]
    on_cuda = device.type == "cuda"
    if on_cuda:  # device kernels; rounds bound them loosely (kernels may run after the host range ends)
        spans = [(e.time_range.start, e.time_range.end, e.name) for e in events if e.device_type == DeviceType.CUDA]
        rounds = [(r0, max([s[1] for s in spans if r0 <= s[0] < r1], default=r1)) for r0, r1 in rounds]
        key = "self_device_time_total"
    else:  # the decoding thread's top-level ops: direct children of a round range
        ids = {id(e) for e in round_events}
        spans = [(e.time_range.start, e.time_range.end, e.name) for e in events
                 if e.cpu_parent is not None and id(e.cpu_parent) in ids]
        key = "self_cpu_time_total"
    idle, gaps = _gaps(spans, rounds)
    round_us = sum(r1 - r0 for r0, r1 in rounds)
    busy = round_us - idle

    table = sorted(prof.key_averages(), key=lambda a: getattr(a, key), reverse=True)
    table = [a for a in table if a.key != ROUND and getattr(a, key) > 0][:40]
    kind = "kernel" if on_cuda else "op (self CPU time)"
    lines = [f"| {kind} | calls | total µs | µs per call | share of rounds |", "|---|---|---|---|---|"]
    for a in table:
        total = getattr(a, key)
        lines.append(f"| `{a.key[:80]}` | {a.count} | {total:.0f} | {total / max(a.count, 1):.1f} | "
                     f"{100 * total / max(round_us, 1e-9):.1f}% |")
    lines.append(f"\n{config.rounds} rounds of {config.method} (scheduler {config.scheduler}) at concurrency "
                 f"{config.concurrency} on {device}, {config.dtype}; median round {statistics.median(wall):.2f} ms; "
                 f"idle between {'kernels' if on_cuda else 'top-level ops'}: {idle / config.rounds:.0f} µs per round "
                 f"({100 * idle / max(round_us, 1e-9):.1f}%).")
    (out / "kernels.md").write_text("\n".join(lines) + "\n")

    summary = {
        "config": asdict(config), "device": str(device), "torch": torch.__version__, "threads": torch.get_num_threads(),
        "round_ms": wall, "median_round_ms": statistics.median(wall),
        "busy_us_per_round": busy / config.rounds, "idle_us_per_round": idle / config.rounds,
        "idle_share": idle / max(round_us, 1e-9), "gaps_measured_between": "kernels" if on_cuda else "top-level ops",
        "largest_gaps": sorted(gaps, key=lambda g: -g["us"])[:10], "nsys": NSYS_RECIPE,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    say(f"median round {summary['median_round_ms']:.2f} ms, idle {summary['idle_us_per_round']:.0f} µs per round; "
        f"wrote trace.json, kernels.md and summary.json to {out}")
    return summary
