#!/usr/bin/env python3
"""Routed-expert paths on this CPU: the per-token gather reference against computing every expert
(`experts_dense`), over token counts and experts-per-slot ratios E/K. Prints ms per call and the
speed-up of the dense path measured in the same run: the crossover behind `ops.moe.experts`'
choice (DENSE_MAX_RATIO, DENSE_MIN_TOKENS_PER_RATIO).

    python tools/bench_experts.py --threads 1
"""

from __future__ import annotations

import argparse
import time

import torch

from dspark.ops.moe import experts_dense, experts_ref


def best_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * min(times)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--hidden", type=int, default=128, help="D (default: nano's 128)")
    ap.add_argument("--inter", type=int, default=192, help="I (default: nano's 192)")
    ap.add_argument("--k", type=int, default=2, help="experts per token (default: nano's 2)")
    ap.add_argument("--ratios", default="2,4,8,16,32", help="E/K values")
    ap.add_argument("--tokens", default="1,8,64,512", help="token counts N")
    ap.add_argument("--repeats", type=int, default=20)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    print(f"D={args.hidden} I={args.inter} K={args.k}, {args.threads} thread(s); best of {args.repeats}")
    print(f"{'E/K':>4} {'N':>5} {'gather ms':>10} {'dense ms':>9} {'dense speed-up':>15}")
    with torch.no_grad():
        for ratio in (int(r) for r in args.ratios.split(",")):
            e = ratio * args.k
            gate_up = torch.randn(e, 2 * args.inter, args.hidden, generator=g) / args.hidden ** 0.5
            down = torch.randn(e, args.hidden, args.inter, generator=g) / args.inter ** 0.5
            for n in (int(t) for t in args.tokens.split(",")):
                x = torch.randn(n, args.hidden, generator=g)
                idx = torch.rand(n, e, generator=g).argsort(-1)[:, :args.k]
                w = torch.rand(n, args.k, generator=g)
                ref = best_ms(lambda: experts_ref(x, w, idx, gate_up, down, 10.0), args.repeats)
                dense = best_ms(lambda: experts_dense(x, w, idx, gate_up, down, 10.0), args.repeats)
                print(f"{ratio:>4} {n:>5} {ref:>10.3f} {dense:>9.3f} {ref / dense:>14.2f}×")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
