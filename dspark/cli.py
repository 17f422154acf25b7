"""`dspark` on the command line."""

from __future__ import annotations

import argparse
import sys
import time

import torch

from dspark.config import ModelConfig


def _load_target(args):
    from dspark.model.target import DeepseekV4

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    if args.model:
        return DeepseekV4.from_pretrained(args.model, dtype=dtype, device=args.device)
    return DeepseekV4.random(ModelConfig.preset(args.preset), seed=args.seed, dtype=dtype, device=args.device)


def _prompt_ids(args, vocab_size: int) -> list[int]:
    if args.prompt_ids:
        ids = [int(t) for t in args.prompt_ids.split(",") if t.strip()]
    else:
        # No tokenizer ships yet: bytes of the UTF-8 prompt are the token ids.
        ids = list(args.prompt.encode("utf-8"))
    bad = [t for t in ids if not 0 <= t < vocab_size]
    if not ids:
        raise SystemExit("error: the prompt is empty")
    if bad:
        raise SystemExit(f"error: token ids {bad[:5]} are outside the model's vocabulary [0, {vocab_size})")
    return ids


def cmd_generate(args) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    model = _load_target(args).eval()
    source = args.model or f"random '{args.preset}' model (seed {args.seed}; no trained default model ships yet)"
    print(f"model: {source}", file=sys.stderr)
    ids = _prompt_ids(args, model.config.vocab_size)
    if len(ids) + args.max_new_tokens > model.config.max_position_embeddings:
        raise SystemExit(f"error: prompt + max_new_tokens exceeds the model's {model.config.max_position_embeddings} positions")
    gen = torch.Generator().manual_seed(args.seed)
    seq = torch.tensor([ids])
    start = time.perf_counter()
    new = []
    with torch.no_grad():
        for _ in range(args.max_new_tokens):
            # Plain full-sequence recompute: the cached engine replaces this loop (issue #4).
            logits = model(seq)[0, -1]
            if args.temperature == 0:
                token = int(logits.argmax())
            else:
                token = int(torch.multinomial(torch.softmax(logits / args.temperature, -1), 1, generator=gen))
            new.append(token)
            seq = torch.cat([seq, torch.tensor([[token]])], dim=1)
            print(token, end=" ", flush=True)
    elapsed = time.perf_counter() - start
    print()
    print(f"{len(new)} tokens in {elapsed:.2f} s ({len(new) / elapsed:.1f} tok/s), method: ar (uncached)",
          file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dspark", description="Lossless speculative decoding for DeepSeek-V4-class models.")
    sub = parser.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="generate tokens from a prompt",
                       description="Generate from a prompt. Without --model a small RANDOM model is used "
                                   "(the trained default model does not ship yet), so the output is noise.")
    g.add_argument("--model", help="checkpoint directory (HF or upstream names, sharded FP8/FP4 accepted)")
    g.add_argument("--preset", default="tiny", help="random-weight preset when no --model is given (default: tiny)")
    g.add_argument("--prompt", default="def fibonacci(n):", help="prompt text (UTF-8 bytes become token ids)")
    g.add_argument("--prompt-ids", help="comma-separated token ids instead of --prompt")
    g.add_argument("--max-new-tokens", type=int, default=16)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    g.add_argument("--device", default="cpu")
    g.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    g.set_defaults(func=cmd_generate)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "max_new_tokens", 1) < 1:
        raise SystemExit("error: --max-new-tokens must be at least 1")
    if getattr(args, "temperature", 0.0) < 0:
        raise SystemExit("error: --temperature must be >= 0")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
