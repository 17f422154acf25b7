#!/usr/bin/env python3
"""End-to-end decoding speed of the embedded nano model: ar, mtp and dspark at a few concurrencies,
eager and (on CUDA) with decode rounds replayed from CUDA graphs.

Per point: C requests (T = 1, seeded) prefill, decode a few warm-up rounds, then rounds are timed
(device-synchronised wall clock) while all C requests still decode. Reported: per-user tokens/s,
tokens per round, and the ratio to ar at the same concurrency and graph mode, measured in the same
run. Part of tools/gpu_check.sh; runs on CPU too (graphs off) for a smoke check.

    python tools/gpu_e2e.py --out bench/results/gpu                 # CUDA, bf16, eager and graphs
    python tools/gpu_e2e.py --device cpu --dtype fp32 --graphs off --out /tmp/e2e
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from contextlib import closing
from pathlib import Path

import torch

from dspark.config import SamplingParams
from dspark.decode.generate import run
from dspark.llm import LLM
from dspark.profiling import PROMPTS


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(method: str, concurrency: int, graphs: bool, args) -> dict:
    llm = LLM(args.model, method=method, dtype=args.dtype, device=args.device, max_batch=concurrency,
              cuda_graphs=graphs)
    engine = llm.engine
    device = engine.target.lm_head.weight.device
    prompts = [llm.tokenizer.encode(PROMPTS[i % len(PROMPTS)]) for i in range(concurrency)]
    params = [SamplingParams(temperature=1.0, seed=args.seed + i, max_tokens=args.tokens) for i in range(concurrency)]
    tokens = rounds = 0
    seconds = 0.0
    with closing(run(engine, prompts, params)) as steps:
        while engine.prefilling:
            next(steps)
        for _ in range(args.warmup):  # graphs: the first round of a shape runs eagerly, the second captures
            next(steps)
        while rounds < args.rounds:
            _sync(device)
            start = time.perf_counter()
            outs = next(steps, None)
            _sync(device)
            if outs is None or any(o.finished for o in outs):  # a round that finished a request: not steady state
                break
            seconds += time.perf_counter() - start
            tokens += sum(len(o.new_token_ids) for o in outs)
            rounds += 1
    if rounds == 0:
        raise RuntimeError(f"{method} at concurrency {concurrency}: no steady round; raise --tokens")
    replays = engine.graphs.replays if engine.graphs is not None else 0
    return dict(method=method, concurrency=concurrency, graphs=graphs, rounds=rounds, graph_replays=replays,
                tokens_per_round=tokens / rounds / concurrency, round_ms=1000 * seconds / rounds,
                per_user_tps=tokens / seconds / concurrency)


def table(rows: list[dict]) -> str:
    ar = {(r["concurrency"], r["graphs"]): r["per_user_tps"] for r in rows if r["method"] == "ar"}
    lines = ["| method | C | graphs | per-user tok/s | ÷ ar (same C, graphs) | tokens/round/user | round ms |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        base = ar.get((r["concurrency"], r["graphs"]))
        ratio = f"{r['per_user_tps'] / base:.2f}×" if base else "–"
        lines.append(f"| {r['method']} | {r['concurrency']} | {'on' if r['graphs'] else 'off'} | "
                     f"{r['per_user_tps']:.1f} | {ratio} | {r['tokens_per_round']:.2f} | {r['round_ms']:.2f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="directory for e2e.json")
    ap.add_argument("--model", default="nano", help="checkpoint directory or packaged model (default: nano)")
    ap.add_argument("--methods", default="ar,mtp,dspark", help="comma-separated methods (default: ar,mtp,dspark)")
    ap.add_argument("--concurrency", default="1,8", help="comma-separated concurrencies (default: 1,8)")
    ap.add_argument("--graphs", choices=["both", "on", "off"], default="both",
                    help="CUDA graphs off, on, or both (default: both; CPU: off only)")
    ap.add_argument("--device", default="cuda", help="torch device (default: cuda)")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"], help="weight dtype (default: bf16)")
    ap.add_argument("--tokens", type=int, default=96, help="max tokens per request (default: 96)")
    ap.add_argument("--warmup", type=int, default=3, help="decode rounds before timing (default: 3)")
    ap.add_argument("--rounds", type=int, default=30, help="most timed rounds per point (default: 30)")
    ap.add_argument("--seed", type=int, default=0, help="request i samples with seed + i (default: 0)")
    ap.add_argument("--budget-s", type=float, default=0, help="stop starting new points after this many seconds")
    args = ap.parse_args(argv)
    modes = {"both": [False, True], "on": [True], "off": [False]}[args.graphs]
    if not args.device.startswith("cuda") and True in modes:
        if args.graphs == "on":
            raise SystemExit("error: CUDA graphs need --device cuda")
        modes = [False]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows, start = [], time.perf_counter()
    for graphs in modes:
        for c in (int(x) for x in args.concurrency.split(",")):
            for method in args.methods.split(","):
                if args.budget_s and time.perf_counter() - start > args.budget_s:
                    print(f"budget reached: skipping {method} C={c} graphs={graphs}", file=sys.stderr)
                    continue
                try:
                    rows.append(measure(method, c, graphs, args))
                except Exception as e:  # keep the other points; say what failed
                    rows.append(dict(method=method, concurrency=c, graphs=graphs, error=f"{type(e).__name__}: {e}"))
                    print(f"{method} C={c} graphs={graphs}: {rows[-1]['error']}", file=sys.stderr)
                (out / "e2e.json").write_text(json.dumps({"device": args.device, "dtype": args.dtype,
                                                          "torch": torch.__version__, "rows": rows}, indent=1) + "\n")
    print(table([r for r in rows if "error" not in r]))
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
