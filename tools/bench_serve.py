#!/usr/bin/env python3
"""Load a running `dspark serve` over HTTP, in the style of vLLM's `benchmark_serving`.

Requests take prompts from a file (one per line, or JSON lines with "prompt") and arrive as a Poisson
process at each --request-rate (inf: all at once), optionally capped at --max-concurrency in flight;
each streams from /v1/completions. Per run: request and output-token throughput, TTFT / TPOT / ITL
percentiles, per-user speed (a request's tokens after the first over its time after the first token,
averaged over requests), and τ and acceptance from the server's /metrics (before/after difference).
One JSON line per run goes to --out/results.jsonl; --plot draws per-user speed against aggregate
throughput for every label and rate there (the paper's Fig. 7 axes) from those real HTTP runs.

    dspark serve --model nano --method dspark --port 8000 &
    python tools/bench_serve.py --url http://127.0.0.1:8000 --prompts prompts.txt --label dspark \\
        --request-rate 2 8 inf --num-prompts 32 --max-tokens 64 --out bench/results/serve-nano

    # or let the tool start (and stop) the server for each label:
    python tools/bench_serve.py --launch "dspark serve --model nano --method mtp --port 8011" \\
        --url http://127.0.0.1:8011 --label mtp-1 ... ;  python tools/bench_serve.py --plot --out DIR
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import shlex
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from dspark.serve.metrics import parse


@dataclass
class Result:
    prompt_tokens: int = 0
    output_tokens: int = 0
    ttft: float | None = None
    latency: float = 0.0
    itl: list[float] = field(default_factory=list)  # gaps between chunks (a chunk = one round's tokens)
    error: str | None = None


def load_prompts(path: Path, n: int, seed: int) -> list[str]:
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    prompts = [json.loads(line)["prompt"] if line.lstrip().startswith("{") else line.replace("\\n", "\n")
               for line in lines]
    rng = random.Random(seed)
    return [prompts[i % len(prompts)] if i < len(prompts) else rng.choice(prompts) for i in range(n)]


async def one(client: httpx.AsyncClient, args, prompt: str, seed: int) -> Result:
    body = {"model": args.model, "prompt": prompt, "max_tokens": args.max_tokens, "temperature": args.temperature,
            "seed": seed, "stream": True, "stream_options": {"include_usage": True}}
    if args.ignore_eos:
        body["stop_token_ids"] = []
    res, start = Result(), time.perf_counter()
    last = start
    try:
        async with client.stream("POST", "/v1/completions", json=body) as r:
            if r.status_code != 200:
                res.error = f"{r.status_code}: {(await r.aread()).decode()[:200]}"
                return res
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    res.error = chunk["error"]["message"]
                    break
                if chunk.get("usage"):
                    res.prompt_tokens = chunk["usage"]["prompt_tokens"]
                    res.output_tokens = chunk["usage"]["completion_tokens"]
                if chunk.get("choices"):
                    now = time.perf_counter()
                    if res.ttft is None:
                        res.ttft = now - start
                    else:
                        res.itl.append(now - last)
                    last = now
    except httpx.HTTPError as e:
        res.error = f"{type(e).__name__}: {e}"
    res.latency = time.perf_counter() - start
    return res


async def run_rate(args, prompts: list[str], rate: float) -> tuple[list[Result], float]:
    rng = random.Random(args.seed)
    limit = asyncio.Semaphore(args.max_concurrency or len(prompts))
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    async with httpx.AsyncClient(base_url=args.url, headers=headers, timeout=args.timeout,
                                 limits=httpx.Limits(max_connections=None, max_keepalive_connections=None)) as client:

        async def gated(i: int, prompt: str) -> Result:
            async with limit:
                return await one(client, args, prompt, args.seed + i)

        tasks, start = [], time.perf_counter()
        for i, prompt in enumerate(prompts):
            tasks.append(asyncio.create_task(gated(i, prompt)))
            if math.isfinite(rate):
                await asyncio.sleep(rng.expovariate(rate))  # Poisson arrivals
        results = await asyncio.gather(*tasks)
        return results, time.perf_counter() - start


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    k = (len(values) - 1) * q / 100
    lo, hi = math.floor(k), math.ceil(k)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


def spread(seconds: list[float]) -> dict:
    """mean, median and p99 in milliseconds."""
    ms = [x * 1000 for x in seconds]
    return {"mean": statistics.fmean(ms) if ms else float("nan"), "p50": pct(ms, 50), "p90": pct(ms, 90),
            "p99": pct(ms, 99)}


def summarize(args, rate: float, results: list[Result], duration: float, before: dict, after: dict) -> dict:
    ok = [r for r in results if r.error is None and r.ttft is not None]
    out_tokens = sum(r.output_tokens for r in ok)
    tpot = [(r.latency - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]
    per_user = [(r.output_tokens - 1) / (r.latency - r.ttft) for r in ok if r.output_tokens > 1 and r.latency > r.ttft]
    itl = [x for r in ok for x in r.itl]

    def delta(name: str) -> float:
        return sum(v for k, v in after.items() if k.partition("{")[0] == name) - sum(
            v for k, v in before.items() if k.partition("{")[0] == name)

    rounds = delta("dspark:spec_decode_num_drafts")
    drafts = delta("dspark:spec_decode_num_draft_tokens")
    return {
        "label": args.label, "request_rate": "inf" if not math.isfinite(rate) else rate,
        "max_concurrency": args.max_concurrency, "num_prompts": len(results), "completed": len(ok),
        "failed": len(results) - len(ok), "max_tokens": args.max_tokens, "temperature": args.temperature,
        "duration_s": duration, "request_throughput": len(ok) / duration, "output_throughput": out_tokens / duration,
        "total_output_tokens": out_tokens, "per_user_tok_s_mean": statistics.fmean(per_user) if per_user else 0.0,
        "ttft_ms": spread([r.ttft for r in ok]), "tpot_ms": spread(tpot), "itl_ms": spread(itl),
        "tau": delta("dspark:spec_decode_num_emitted_tokens") / rounds if rounds else float("nan"),
        "acceptance": delta("dspark:spec_decode_num_accepted_tokens") / drafts if drafts else float("nan"),
        "server_generation_tokens": delta("dspark:generation_tokens_total"),
        "errors": sorted({r.error for r in results if r.error})[:3],
    }


def metrics(args) -> dict:
    return parse(httpx.get(args.url + "/metrics", timeout=30).text)


def wait_healthy(url: str, proc: subprocess.Popen | None, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"no healthy server at {url} after {timeout:.0f} s")


def line(s: dict) -> str:
    return (f"{s['label']:>10} rate {str(s['request_rate']):>4}: {s['completed']}/{s['num_prompts']} ok, "
            f"{s['output_throughput']:7.1f} tok/s, per-user {s['per_user_tok_s_mean']:6.1f} tok/s, "
            f"TTFT p50 {s['ttft_ms']['p50']:7.1f} ms, TPOT p50 {s['tpot_ms']['p50']:6.1f} ms, "
            f"ITL p50 {s['itl_ms']['p50']:6.1f} ms, tau {s['tau']:.2f}")


def plot(out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines() if x.strip()]
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for label in dict.fromkeys(r["label"] for r in runs):
        mine = sorted((r for r in runs if r["label"] == label), key=lambda r: float(r["request_rate"]))
        ax.plot([r["per_user_tok_s_mean"] for r in mine], [r["output_throughput"] for r in mine], "o-", label=label)
        for r in mine:
            ax.annotate(f"{r['request_rate']}/s", (r["per_user_tok_s_mean"], r["output_throughput"]), fontsize=7,
                        textcoords="offset points", xytext=(4, 4))
    ax.set_xlabel("per-user speed (tokens/s per request)")
    ax.set_ylabel("aggregate throughput (tokens/s)")
    ax.set_title("dspark serve over HTTP (request rates annotated)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = out / "throughput_vs_per_user.png"
    fig.savefig(path, dpi=120)
    return path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default="http://127.0.0.1:8000", help="the server (default: %(default)s)")
    ap.add_argument("--model", default="nano", help="model name the server serves (default: nano)")
    ap.add_argument("--api-key", help="bearer key, if the server wants one")
    ap.add_argument("--label", default="run", help="name of this configuration in the results (e.g. the method)")
    ap.add_argument("--prompts", type=Path, help="prompt file: one per line (\\n escapes) or JSON lines with 'prompt'")
    ap.add_argument("--num-prompts", type=int, default=32, help="requests per rate (default: 32)")
    ap.add_argument("--request-rate", type=float, nargs="+", default=[math.inf],
                    help="requests/s, Poisson arrivals; inf sends all at once (default: inf)")
    ap.add_argument("--max-concurrency", type=int, help="most requests in flight (default: unbounded)")
    ap.add_argument("--max-tokens", type=int, default=64, help="max_tokens per request (default: 64)")
    ap.add_argument("--ignore-eos", action="store_true", help="send stop_token_ids [] (the model's eos still stops)")
    ap.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (default: 0)")
    ap.add_argument("--seed", type=int, default=0, help="arrivals and request seeds (request i: seed + i)")
    ap.add_argument("--timeout", type=float, default=600, help="per-request timeout in seconds (default: 600)")
    ap.add_argument("--warmup", type=int, default=2, help="requests sent one by one before measuring (default: 2)")
    ap.add_argument("--launch", help="start this server command first (and stop it with SIGINT at the end)")
    ap.add_argument("--out", type=Path, help="append one JSON line per rate to OUT/results.jsonl")
    ap.add_argument("--plot", action="store_true", help="draw OUT/throughput_vs_per_user.png from OUT/results.jsonl")
    args = ap.parse_args()
    if args.prompts is None:
        if args.plot and args.out:
            print(plot(args.out))
            return 0
        ap.error("--prompts is required (or --plot with --out)")
    proc = subprocess.Popen(shlex.split(args.launch)) if args.launch else None
    try:
        wait_healthy(args.url, proc, timeout=600)
        prompts = load_prompts(args.prompts, args.num_prompts, args.seed)
        for i in range(args.warmup):
            asyncio.run(run_rate(args, prompts[i:i + 1], math.inf))
        for rate in args.request_rate:
            before = metrics(args)
            results, duration = asyncio.run(run_rate(args, prompts, rate))
            summary = summarize(args, rate, results, duration, before, metrics(args))
            print(line(summary), flush=True)
            if args.out:
                args.out.mkdir(parents=True, exist_ok=True)
                with open(args.out / "results.jsonl", "a") as f:
                    f.write(json.dumps(summary) + "\n")
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
    if args.plot and args.out:
        print(plot(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
