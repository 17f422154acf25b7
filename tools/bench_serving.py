#!/usr/bin/env python3
"""Serve the nano model with the real engine on this CPU at a few concurrencies and compare the
serving simulator's prediction with what was measured in the same run.

For every policy and concurrency C: the same max(C) held-out prompts decode in groups of C that
decode together (T = 1, prompt j seeded seed + j at every C); the verify forwards and the whole
decode rounds are timed. The cost table for the simulator is built
from this run: verify ms per token bucket from `dspark.decode.sps.profile_sps`, and per policy the
rest of a round (drafting, sampling, host loop) as measured. The simulator then replays the
acceptance traces of the same run (full-block traces for the DSpark policies) and predicts per-user
tokens/s; the report gives both and their relative difference, plus Fig. 7 / Fig. 8 style plots of
the simulated sweep over concurrency. All figures are CPU figures of this machine.

    python tools/bench_serving.py --run runs/nano --out bench/results/serving-cpu   # writes table.md too
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

from dspark.config import EngineConfig, SamplingParams
from dspark.decode import Engine
from dspark.decode.generate import run as run_requests
from dspark.decode.sps import profile_sps
from dspark.eval import heldout_files, load_run
from dspark.simulate import CostTable, Policy, TraceRound, plot, simulate, sweep

POLICIES = {  # name → (engine method or draft, scheduler, max verify)
    "ar": ("ar", "fixed", None),
    "mtp-1": ("mtp", "fixed", 1),
    "dspark-fixed": ("dspark", "fixed", None),
    "dspark-hardware": ("dspark", "hardware", None),
}


def engine_for(run, name: str, concurrency: int, max_seq_len: int, sps: list[float]) -> Engine:
    method, scheduler, max_verify = POLICIES[name]
    config = EngineConfig(max_batch=concurrency, max_seq_len=max_seq_len, record_proposals=True, scheduler=scheduler,
                          sps=tuple(sps) if scheduler == "hardware" else None, num_draft_tokens=max_verify)
    return Engine(run.target, method, draft=run.drafts.get(method), config=config)


def measure(engine: Engine, prompts: list[list[int]], max_tokens: int, seed: int, clock) -> dict:
    """Decode every prompt to the end through the host loop; time each decode round and its verify forward.

    Speed is the steady state the simulator models: tokens and time of the rounds in which all
    C requests were still decoding. The rounds after the first request finishes serve fewer users
    (stragglers with low acceptance), which a closed loop of C users never does.
    """
    verify_ms, round_ms, round_tokens, round_full = [], [], [], []
    target = engine.target
    forward = target.forward_batch

    def timed_forward(*a, **k):
        start = clock()
        out = forward(*a, **k)
        verify_ms.append(1000 * (clock() - start))
        return out

    params = [SamplingParams(temperature=1.0, seed=seed + i, max_tokens=max_tokens) for i in range(len(prompts))]
    steps = run_requests(engine, prompts, params)
    stats = {}
    target.forward_batch = timed_forward
    try:
        while True:
            start = clock()
            outs = next(steps, None)
            elapsed = clock() - start
            if outs is None:
                break
            if engine.last_round_requests == 0:  # a prefill step: its forward is not a verify
                verify_ms[len(round_ms):] = []
            else:
                round_ms.append(1000 * elapsed)
                round_full.append(engine.last_round_requests == len(prompts))
                round_tokens.append(sum(len(o.new_token_ids) for o in outs))
            for o in outs:
                stats[o.request_id] = o.stats
    finally:
        target.forward_batch = forward
    steady = [i for i, full in enumerate(round_full) if full]
    tokens = sum(round_tokens[i] for i in steady)
    seconds = sum(round_ms[i] for i in steady) / 1000
    return dict(stats=[stats[i] for i in steps.request_ids], tokens=tokens, seconds=seconds, rounds=len(steady),
                per_user_tps=tokens / seconds / len(prompts), verify_ms=verify_ms,
                other_ms=[r - v for r, v in zip(round_ms, verify_ms)])


def measure_point(run, name: str, c: int, files, args, max_len: int, sps, clock) -> tuple[dict, list]:
    """Concurrency c over the same prompts as every other point: the first max(C) held-out files in
    groups of c, one group after another (so c = 1 is not one prompt's luck). Per group, the median of
    `repeats` runs (same seeds, same tokens: repeats differ only in timing noise)."""
    engine = engine_for(run, name, c, max_len, sps)
    measure(engine, [files[0][: args.prompt_tokens].tolist()], 4, args.seed, clock)  # warm-up
    parts, traces = [], []
    for g in range(max(1, len(files) // c)):
        prompts = [f[: args.prompt_tokens].tolist() for f in files[g * c:(g + 1) * c]]
        runs = []
        for _ in range(args.repeats):
            engine = engine_for(run, name, c, max_len, sps)
            runs.append(measure(engine, prompts, args.max_tokens, args.seed + g * c, clock))
        part = sorted(runs, key=lambda r: r["per_user_tps"])[len(runs) // 2]
        parts.append(part)
        traces += traces_of(part["stats"], engine)
    tokens, seconds, rounds = (sum(p[k] for p in parts) for k in ("tokens", "seconds", "rounds"))
    row = dict(policy=name, concurrency=c, per_user_tps=tokens / seconds / c, tau=tokens / (rounds * c), rounds=rounds,
               verify_ms=statistics.median(v for p in parts for v in p["verify_ms"]),
               other_ms=statistics.median(v for p in parts for v in p["other_ms"]))
    return row, traces


def traces_of(stats_list, engine: Engine) -> list[list[TraceRound]]:
    """Per request, its rounds' full-block acceptances and the confidences the engine's scheduler saw
    (the raw head logits through the drafter's STS temperatures, as `BlockDrafter` calibrates them)."""
    sts = getattr(engine.drafter, "sts", None)
    temps = sts.tolist() if sts is not None else None
    out = []
    for st in stats_list:
        conf = [[1 / (1 + math.exp(-z / (temps[k] if temps else 1.0))) for k, z in enumerate(zs)]
                for zs in st.confidence_logits] if st.confidence_logits else None
        out.append([TraceRound(a, conf[i] if conf else None) for i, a in enumerate(st.accepted)])
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True, help="a finished nano run directory (dspark train-nano --out)")
    ap.add_argument("--out", required=True, help="directory for results.json and the plots")
    ap.add_argument("--concurrency", default="1,4,8", help="concurrencies to measure (default: 1,4,8)")
    ap.add_argument("--policies", default=",".join(POLICIES), help=f"subset of {','.join(POLICIES)}")
    ap.add_argument("--prompt-tokens", type=int, default=32, help="prompt = the first P tokens of a held-out file (default: 32)")
    ap.add_argument("--max-tokens", type=int, default=96, help="tokens generated per request (default: 96)")
    ap.add_argument("--seed", type=int, default=0, help="request i samples with seed + i (default: 0)")
    ap.add_argument("--repeats", type=int, default=3, help="runs per point; the median one is reported (default: 3)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads; 1 times by thread CPU time, more by wall clock (default: 1)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    # With one torch thread every op runs on the calling thread, so its CPU time is the round's cost
    # without the time other processes on a shared machine take the core away; more threads: wall time.
    clock = time.thread_time if args.threads == 1 else time.perf_counter
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    names = args.policies.split(",")
    bad = [n for n in names if n not in POLICIES]
    if bad:
        raise SystemExit(f"error: unknown policies {bad}; expected {list(POLICIES)}")
    run = load_run(args.run, ("ar", "mtp-1", "dspark"))
    gamma = run.drafts["dspark"].block_size
    files = [ids for domain in ("code", "prose")
             for _, ids in heldout_files(run, domain, max(concurrencies), args.prompt_tokens + 1)]
    if len(files) < max(concurrencies):
        raise SystemExit(f"error: only {len(files)} held-out files long enough for the prompts")
    top = max(concurrencies) * (gamma + 1)
    buckets = sorted({1, 2, 4, 8, 16, 32, 64, top} & set(range(1, top + 1)))
    print(f"profiling verify forwards at {buckets} tokens", file=sys.stderr)
    sps_profile = profile_sps(run.target, buckets, requests=max(concurrencies), context=args.prompt_tokens,
                              clock=clock)
    cost = CostTable(verify_ms={b: 1000 / s for b, s in sps_profile.items()}, device="cpu")
    sps = cost.sps(top)
    max_len = args.prompt_tokens + args.max_tokens + gamma + 8

    measured, traces = [], {}
    with torch.no_grad():
        for name in names:
            for c in concurrencies:
                row, point_traces = measure_point(run, name, c, files[:max(concurrencies)], args, max_len, sps, clock)
                cost.draft_ms.setdefault(name, {})[c] = row["other_ms"]
                if name in ("ar", "mtp-1", "dspark-fixed"):
                    traces[name, c] = point_traces
                measured.append(row)
                print(f"{name:16s} C={c:<3d} {row['per_user_tps']:8.2f} tok/s/user", file=sys.stderr)

    policies = {"ar": Policy("ar", "ar", 0), "mtp-1": Policy("mtp-1", "mtp-1", 1),
                "dspark-fixed": Policy("dspark-fixed", "dspark-fixed", gamma),
                "dspark-hardware": Policy("dspark-hardware", "dspark-hardware", gamma, scheduler="hardware")}
    source = {"ar": "ar", "mtp-1": "mtp-1", "dspark-fixed": "dspark-fixed", "dspark-hardware": "dspark-fixed"}
    for row in measured:
        # Each measured point is checked on its own prompts' traces: the same text, so the comparison
        # tests the simulator's costs and scheduling, not which prompts were drawn.
        pred = simulate(traces[source[row["policy"]], row["concurrency"]], cost, policies[row["policy"]], row["concurrency"], rounds=100,
                        seed=args.seed)
        row["simulated_per_user_tps"], row["simulated_tau"] = pred["per_user_tps"], pred["tau"]
        row["relative_error"] = pred["per_user_tps"] / row["per_user_tps"] - 1

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    grid = [1, 2, 4, 8, 16, 32, 64, 128]
    pooled = {p.draft_cost: [t for c in concurrencies for t in traces[source[p.name], c]]
              for p in (policies[n] for n in names)}
    simulated = sweep(pooled, cost,
                      [policies[n] for n in names], grid, rounds=100, seed=args.seed)
    plot(simulated, out / "throughput_vs_per_user.png", out / "budget_vs_concurrency.png")
    cost.save(out / "cost_cpu.json")
    (out / "results.json").write_text(json.dumps({
        "note": "CPU figures of one machine (2 cores, torch threads as given; 1 thread: that thread's CPU time); simulated rows extrapolate the "
                "measured draft cost linearly beyond the measured concurrencies",
        "threads": args.threads, "measured": measured, "simulated": simulated}, indent=1) + "\n")
    table = markdown_table(measured, args.threads, "thread CPU time" if args.threads == 1 else "wall clock")
    (out / "table.md").write_text(table + "\n")
    print(table)
    return 0


def markdown_table(measured: list[dict], threads: int, clock: str) -> str:
    """Measured per-user tok/s, the ratio to ar at the same concurrency (same run), and the simulator's error."""
    ar = {r["concurrency"]: r["per_user_tps"] for r in measured if r["policy"] == "ar"}
    lines = ["| policy | concurrency | per-user tok/s (measured) | ÷ ar, same run | τ | simulated | simulated τ | "
             "simulator error |", "|---|---|---|---|---|---|---|---|"]
    for r in measured:
        ratio = f"{r['per_user_tps'] / ar[r['concurrency']]:.2f}×" if r["concurrency"] in ar else "–"
        lines.append(f"| {r['policy']} | {r['concurrency']} | {r['per_user_tps']:.1f} | {ratio} | {r['tau']:.2f} | "
                     f"{r['simulated_per_user_tps']:.1f} | {r['simulated_tau']:.2f} | {100 * r['relative_error']:+.1f}% |")
    lines.append(f"\nCPU, {clock}, one 2-core machine, {threads} torch thread(s); T = 1; decode rounds only "
                 "(prefill excluded), counted while all C requests decode (the steady state the simulator models). "
                 "The simulator replays the acceptance traces of the same prompts (dspark-hardware: the full-block "
                 "traces of dspark-fixed) with this run's measured costs.")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
