"""`dspark` on the command line."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from dspark.config import SamplingParams
from dspark.decode.engine import METHODS
from dspark.llm import DTYPES, LLM, Completion

DEFAULT_PROMPT = "def fibonacci(n):"

GENERATE_EPILOG = """\
examples:
  dspark generate --prompt "def fibonacci(n):" --max-tokens 32
  dspark generate --prompt "a" --prompt "b" --temperature 0.8 --top-p 0.95 --seed 1
  dspark generate --model ./DeepSeek-V4-Flash --method mtp --prompt-file prompt.txt --stop "return"

The text goes to stdout (streamed for one prompt; control characters are shown escaped on a
terminal); progress and a final stats line (method, tokens, seconds, tok/s, rounds, tau = mean
tokens per round incl. the bonus token) go to stderr."""

# C0/C1 control characters but newline and tab, as \xNN: random-weight output must not drive the
# terminal (an ESC byte starts an escape sequence).
_TERMINAL_ESCAPES = {c: f"\\x{c:02x}" for c in [*range(0x20), *range(0x7F, 0xA0)] if chr(c) not in "\n\t"}


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        # One line instead of argparse's usage dump; exit status 2 as argparse's.
        self.exit(2, f"error: {message} (see '{self.prog} --help')\n")


class _Progress:
    """Tokens generated and tok/s on stderr: rewritten in place on a terminal, else a plain
    line every `interval` seconds (logs); `off` when the streamed text shares the terminal."""

    def __init__(self, stream, mode: str, interval: float = 5.0):
        self.stream, self.mode, self.interval = stream, mode, interval
        # Elapsed time of the last line: a terminal shows the first update at once, a log waits.
        self._last = None if mode == "in-place" else 0.0

    def update(self, tokens: int, elapsed: float) -> None:
        if self.mode == "off":
            return
        gap = 0.1 if self.mode == "in-place" else self.interval
        if self._last is not None and elapsed - self._last < gap:
            return
        self._last = elapsed
        line = f"{tokens} tokens, {tokens / max(elapsed, 1e-9):.1f} tok/s"
        if self.mode == "in-place":
            self.stream.write(f"\r\033[K{line}")
        else:
            self.stream.write(f"progress: {line}\n")
        self.stream.flush()

    def done(self) -> None:
        if self.mode == "in-place" and self._last is not None:
            self.stream.write("\r\033[K")
            self.stream.flush()


def _prompts(args) -> list[str]:
    prompts = list(args.prompt or [])
    for name in args.prompt_file or []:
        if name == "-":
            prompts.append(sys.stdin.read())
        else:
            try:
                prompts.append(Path(name).read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError) as e:
                raise ValueError(f"cannot read prompt file {name}: {e}") from None
    return prompts or [DEFAULT_PROMPT]


def _stats_line(method: str, completions: list[Completion], elapsed: float) -> str:
    tokens = sum(len(c.token_ids) for c in completions)
    stats = [c.stats for c in completions if c.stats is not None]
    rounds = sum(s.rounds for s in stats)
    # τ over all requests: every round of every request weighs the same.
    tau = sum(s.tau * s.rounds for s in stats) / rounds if rounds else 0.0
    return (f"method {method}: {tokens} tokens in {elapsed:.2f} s ({tokens / max(elapsed, 1e-9):.1f} tok/s), "
            f"{rounds} rounds, τ {tau:.2f} tokens/round")


def cmd_generate(args) -> int:
    if args.threads < 0:
        raise ValueError(f"--threads must be >= 0, got {args.threads}")
    if args.threads:
        torch.set_num_threads(args.threads)
    prompts = _prompts(args)
    # Check the sampling values before loading a model that may take minutes (no stop token
    # ids come from the command line, so the vocabulary size does not matter here).
    SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                   max_tokens=args.max_tokens).validate(vocab_size=0)
    if args.model is not None and not Path(args.model).is_dir():
        raise ValueError(f"--model: no checkpoint directory at {args.model}")
    # A random preset says so on stderr itself, before anything is generated.
    llm = LLM(args.model or args.preset or "tiny", method=args.method, num_draft_tokens=args.num_draft_tokens,
              dtype=args.dtype, device=args.device, max_batch=min(len(prompts), 8))
    updates = llm.updates(prompts, max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k,
                          top_p=args.top_p, seed=args.seed, stop=args.stop)
    streaming = len(prompts) == 1
    escapes = _TERMINAL_ESCAPES if sys.stdout.isatty() else {}
    if not sys.stderr.isatty():
        mode = "lines"
    elif streaming and sys.stdout.isatty():
        mode = "off"  # the streamed text is the progress; a rewritten line would overwrite it
    else:
        mode = "in-place"
    progress = _Progress(sys.stderr, mode)
    completions: dict[int, Completion] = {}
    tokens, start = 0, time.perf_counter()
    for update in updates:
        tokens += len(update.token_ids)
        if streaming and update.text:
            sys.stdout.write(update.text.translate(escapes))
            sys.stdout.flush()
        if update.completion is not None:
            completions[update.index] = update.completion
        progress.update(tokens, time.perf_counter() - start)
    elapsed = time.perf_counter() - start
    progress.done()
    results = [completions[i] for i in range(len(prompts))]
    if streaming:
        print()
    else:
        for i, c in enumerate(results):
            print(f"--- completion {i + 1}/{len(results)} ({c.finish_reason}) ---")
            print(c.text.translate(escapes))
    print(_stats_line(llm.method, results, elapsed), file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="dspark", description="Lossless speculative decoding for DeepSeek-V4-class models.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    g = sub.add_parser(
        "generate", help="generate text from prompts", epilog=GENERATE_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Generate text from one or more prompts (several prompts run batched together).\n"
                    "Without --model a preset with RANDOM weights is used (no trained default model\n"
                    "ships yet), so the output is noise that only shows the stack runs.")
    source = g.add_mutually_exclusive_group()
    source.add_argument("--model", metavar="PATH",
                        help="checkpoint directory: config.json, safetensors (HF or upstream names, sharded "
                             "FP8/FP4 accepted) and tokenizer.json")
    source.add_argument("--preset", metavar="NAME",
                        help="random-weight model preset used without --model, e.g. tiny or flash-proxy "
                             "(default: tiny)")
    g.add_argument("--prompt", action="append", metavar="TEXT",
                   help=f"prompt text; repeat for several prompts (default: {DEFAULT_PROMPT!r})")
    g.add_argument("--prompt-file", action="append", metavar="FILE",
                   help="read one prompt from FILE ('-' for stdin); repeatable, combines with --prompt")
    g.add_argument("--method", choices=METHODS, default="ar",
                   help="decoding method: ar (plain autoregressive), mtp (the model's MTP module drafts), "
                        "ngram (prompt lookup); every method gives the same output distribution (default: ar)")
    g.add_argument("--num-draft-tokens", type=int, metavar="K",
                   help="tokens drafted per round (default: the method's own; ar drafts none)")
    g.add_argument("--max-tokens", type=int, default=64, metavar="N",
                   help="most tokens to generate per prompt (default: 64)")
    g.add_argument("--temperature", type=float, default=0.0, metavar="T",
                   help="sampling temperature; 0 is greedy (default: 0)")
    g.add_argument("--top-k", type=int, default=0, metavar="K",
                   help="sample from the K most likely tokens only; 0 is off (default: 0)")
    g.add_argument("--top-p", type=float, default=1.0, metavar="P",
                   help="sample from the smallest set of tokens with probability >= P; 1 is off (default: 1)")
    g.add_argument("--seed", type=int, default=0, metavar="N",
                   help="sampling seed; prompt i uses N + i, so runs repeat exactly (default: 0)")
    g.add_argument("--stop", action="append", metavar="TEXT",
                   help="stop before this text (not printed); repeatable. The model's end-of-sequence "
                        "tokens always stop")
    g.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="weight dtype (default: fp32)")
    g.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default: cpu)")
    g.add_argument("--threads", type=int, default=0, metavar="N",
                   help="torch CPU threads; 0 keeps torch's default (default: 0)")
    g.set_defaults(func=cmd_generate)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, OSError) as e:  # bad values and missing files: one line, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
