#!/usr/bin/env python3
"""The CPU sampling references when every request is greedy: temperature passed as None (known on the
host, `SlotState.sampling`) against the same greedy rows passed as a tensor of zeros, which computes
every token's integer weight before the one-hot replaces them. Prints ms per call of `probs`,
`sample_logits` and a verify round's `chain_rejection` at nano's vocabulary, and the speed-up of the
None path measured in the same run (the outputs are checked equal first).

    python tools/bench_sampling.py --threads 1
"""

from __future__ import annotations

import argparse

import torch

from bench_experts import best_ms  # tools/ leads sys.path when this runs as a script
from dspark import ops


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--vocab", type=int, default=8192, help="V (default: nano's 8192)")
    ap.add_argument("--requests", default="1,8,32", help="request counts R")
    ap.add_argument("--gamma", type=int, default=7, help="drafts per request in the rejection case")
    ap.add_argument("--repeats", type=int, default=20)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    v, gamma = args.vocab, args.gamma
    print(f"V={v}, γ={gamma}, {args.threads} thread(s); best of {args.repeats}; kernels='ref'")
    print(f"{'op':>15} {'R':>4} {'zeros ms':>9} {'None ms':>8} {'None speed-up':>14}")
    for r in (int(x) for x in args.requests.split(",")):
        logits = torch.randn(r, v, generator=g) * 3
        u = torch.rand(r, generator=g)
        zeros = torch.zeros(r)
        target = torch.randn(r * (gamma + 1), v, generator=g) * 3
        draft = torch.randn(r, gamma, v, generator=g) * 3
        tokens = draft.argmax(-1)
        start, lengths = torch.arange(r) * (gamma + 1), torch.full((r,), gamma)
        stops = torch.full((r, 1), -1)
        accept_u, sample_u = torch.rand(r, gamma, generator=g), torch.rand(r, generator=g)

        def rejection(t):
            return ops.chain_rejection(target, start, lengths, draft, tokens, t, None, None, stops, accept_u,
                                       sample_u, kernels="ref")

        cases = {
            "probs": lambda t: ops.probs(logits, t, None, None, kernels="ref"),
            "sample_logits": lambda t: ops.sample_logits(logits, t, None, None, u, kernels="ref"),
            "chain_rejection": rejection,
        }
        for name, fn in cases.items():
            a, b = fn(zeros), fn(None)
            same = all(torch.equal(x, y) for x, y in zip(a, b)) if isinstance(a, tuple) else torch.equal(a, b)
            if not same:
                raise SystemExit(f"{name}: temperature None and zeros disagree")
            slow = best_ms(lambda: fn(zeros), args.repeats)
            fast = best_ms(lambda: fn(None), args.repeats)
            print(f"{name:>15} {r:>4} {slow:>9.3f} {fast:>8.3f} {slow / fast:>13.1f}×")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
