"""`dspark` on the command line: every subcommand's parser and handler. (Over 500 lines on purpose: one
file, so `dspark --help`, each subcommand's `--help` and its examples read together.)"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from dspark.config import KERNELS, SamplingParams
from dspark.decode.methods import METHODS, draft_methods
from dspark.decode.schedule import SCHEDULERS
from dspark.llm import DTYPES, LLM, Completion, default_model

DEFAULT_PROMPT = "def fibonacci(n):"

GENERATE_EPILOG = """\
examples:
  dspark generate --prompt "def fibonacci(n):" --max-tokens 32
  dspark generate --prompt "a" --prompt "b" --temperature 0.8 --top-p 0.95 --seed 1
  dspark generate --model ./DeepSeek-V4-Flash --method mtp --prompt-file prompt.txt --stop "return"
  dspark generate --model ./Qwen3-8B --draft ./dspark_qwen3_8b_block7 --method dspark --chat "What is 12 * 7?"

--chat wraps each text as one user message and renders it with the checkpoint's own chat template
(chat_template.jinja or tokenizer_config.json's), as transformers' apply_chat_template does.

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
    if args.chat and (args.prompt or args.prompt_file):
        raise ValueError("--chat and --prompt / --prompt-file exclude each other")
    prompts = args.chat or _prompts(args)
    # Check the sampling values before loading a model that may take minutes (no stop token
    # ids come from the command line, so the vocabulary size does not matter here).
    SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                   max_tokens=args.max_tokens)
    if args.model is not None and not Path(args.model).is_dir():
        raise ValueError(f"--model: no checkpoint directory at {args.model}")
    if args.draft is not None and not Path(args.draft).is_dir():
        raise ValueError(f"--draft: no draft checkpoint directory at {args.draft}")
    # A random preset says so on stderr itself, before anything is generated.
    llm = LLM(args.model or args.preset or default_model(), method=args.method, draft=args.draft,
              num_draft_tokens=args.num_draft_tokens,
              dtype=args.dtype, device=args.device, max_batch=min(len(prompts), 8), scheduler=args.scheduler,
              cuda_graphs=args.cuda_graphs, compile=args.compile, kernels=args.kernels)
    streaming = len(prompts) == 1
    escapes = _TERMINAL_ESCAPES if sys.stdout.isatty() else {}
    if not sys.stderr.isatty():
        mode = "lines"
    elif streaming and sys.stdout.isatty():
        mode = "off"  # the streamed text is the progress; a rewritten line would overwrite it
    else:
        mode = "in-place"
    progress = _Progress(sys.stderr, mode)
    tokens, start = 0, time.perf_counter()

    def on_text(index: int, text: str, token_ids: list[int]) -> None:
        nonlocal tokens
        tokens += len(token_ids)
        if streaming and text:
            sys.stdout.write(text.translate(escapes))
            sys.stdout.flush()
        progress.update(tokens, time.perf_counter() - start)

    sampling = dict(max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                    seed=args.seed, stop=args.stop, on_text=on_text)
    if args.chat:
        results = llm.chat([[{"role": "user", "content": text}] for text in args.chat],
                           enable_thinking=args.thinking, **sampling)
    else:
        results = llm.generate(prompts, **sampling)
    elapsed = time.perf_counter() - start
    progress.done()
    if streaming:
        print()
    else:
        for i, c in enumerate(results):
            print(f"--- completion {i + 1}/{len(results)} ({c.finish_reason}) ---")
            print(c.text.translate(escapes))
    print(_stats_line(llm.method, results, elapsed), file=sys.stderr)
    failed = [(i, c.error) for i, c in enumerate(results) if c.finish_reason == "error"]
    for i, message in failed:
        print(f"error: prompt {i + 1}: {message}", file=sys.stderr)
    return 1 if failed else 0


TRAIN_EPILOG = """\
examples:
  dspark train-draft --target tiny --out runs/tiny-dspark --steps 300
  dspark train-draft --target ./nano --kind dflash --data corpus/ --seq-len 256 --calibrate 32

Writes OUT/checkpoint (resumed automatically), OUT/loss.jsonl (one JSON line per step), and the
trained draft in OUT/draft; with --calibrate, STS temperatures (OUT/draft/sts.json), a metric table
(OUT/calibration.txt) and a reliability diagram (OUT/reliability.png)."""


def _load_target_for_training(args):
    from dspark.config import ModelConfig
    from dspark.model.target import DeepseekV4

    if Path(args.target).is_dir():
        return DeepseekV4.from_pretrained(args.target).eval()
    return DeepseekV4.random(ModelConfig.preset(args.target), seed=args.seed).eval()


def _training_sequences(args, target):
    from dspark.train.data import SequenceData
    from dspark.train.recipe import self_generated

    gen = torch.Generator().manual_seed(args.seed)
    if args.data:
        from dspark.text import load_tokenizer

        if not Path(args.target).is_dir():
            raise ValueError("--data needs a --target checkpoint directory with a tokenizer.json")
        tok = load_tokenizer(args.target)
        files = [f for p in args.data for f in (sorted(Path(p).rglob("*")) if Path(p).is_dir() else [Path(p)])
                 if f.is_file()]
        seqs = [torch.tensor(ids) for ids in (tok.encode(f.read_text(errors="replace")) for f in files)
                if len(ids) >= args.seq_len]
        if not seqs:
            raise ValueError(f"no file under {args.data} has {args.seq_len} tokens")
        return SequenceData(seqs, args.seq_len)
    vocab = target.config.vocab_size
    prompts = [torch.randint(0, vocab, (4,), generator=gen).tolist() for _ in range(args.sequences)]
    print(f"generating {args.sequences} training sequences of {args.seq_len + 16} tokens with the target",
          file=sys.stderr)
    return SequenceData(self_generated(target, prompts, args.seq_len + 16, seed=args.seed), args.seq_len)


def cmd_train_draft(args) -> int:
    from dspark.config import TrainConfig
    from dspark.train.recipe import calibrate_draft, new_draft, train_draft

    if args.threads:
        torch.set_num_threads(args.threads)
    config = TrainConfig(steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len,
                         num_anchors=args.anchors, lr=args.lr, seed=args.seed, checkpoint_every=args.checkpoint_every)
    target = _load_target_for_training(args)
    taps = tuple(int(t) for t in args.taps.split(",")) if args.taps else None
    draft_kw = dict(layers=args.layers) if args.kind == "dspark-v4" else dict(
        layers=args.layers, block_size=args.block_size, markov_rank=args.markov_rank, markov_head=args.markov_head,
        taps=taps)
    draft = new_draft(target, args.kind, args.seed, **draft_kw)
    data = _training_sequences(args, target)
    start = time.perf_counter()
    last = train_draft(target, draft, data, config, args.kind, args.out, progress=not args.no_progress,
                       resume=not args.no_resume)
    print(f"trained {args.kind} for {config.steps} steps in {time.perf_counter() - start:.1f} s: "
          f"loss {last.get('loss', float('nan')):.4f}, tau_probabilistic "
          f"{last.get('train/tau_probabilistic', float('nan')):.3f}; draft in {Path(args.out) / 'draft'}",
          file=sys.stderr)
    if args.calibrate:
        if args.kind.startswith("dflash"):
            raise ValueError("--calibrate needs a confidence head (kind dspark or dspark-v4)")
        gen = torch.Generator().manual_seed(args.seed + 1)
        prompts = [torch.randint(0, target.config.vocab_size, (8,), generator=gen).tolist()
                   for _ in range(args.calibrate)]
        rows = calibrate_draft(target, draft, prompts, args.out, seed=args.seed)
        from dspark.train.calibrate import format_table

        print(format_table(rows), file=sys.stderr)
    return 0


def cmd_sps(args) -> int:
    from dspark.decode.sps import cached_profile, default_buckets

    if args.threads:
        torch.set_num_threads(args.threads)
    target = _load_target_for_training(args)
    buckets = sorted({int(b) for b in args.buckets.split(",")}) if args.buckets else default_buckets(args.max_tokens)
    if not buckets or buckets[0] < 1:
        raise ValueError("--buckets must be positive token counts")
    profile = cached_profile(target, buckets, requests=args.requests, context=args.context, refresh=args.refresh)
    print(f"{'tokens B':>8} {'ms/step':>9} {'steps/s':>9} {'tokens/s':>10}")
    for b, sps in sorted(profile.items()):
        print(f"{b:>8} {1000 / sps:>9.2f} {sps:>9.1f} {b * sps:>10.1f}")
    return 0


def cmd_train_nano(args) -> int:
    from dspark.train.nano import NanoRecipe, export, run

    recipe = NanoRecipe.smoke() if args.smoke else NanoRecipe.full()
    if args.threads:
        import dataclasses

        recipe = dataclasses.replace(recipe, threads=args.threads)
    hashes = run(recipe, args.out, progress=not args.no_progress, stop_target_after=args.stop_after)
    if "stopped_at" in hashes:
        print(f"stopped after target step {hashes['stopped_at']}; run again to resume", file=sys.stderr)
        return 0
    for name, digest in hashes.items():
        print(f"{name:10s} {digest}")
    if args.export:
        print(f"exported to {export(args.out, args.export)}", file=sys.stderr)
    return 0


EVAL_EPILOG = """\
examples:
  dspark eval --run /tmp/nano-smoke --files 4 --max-tokens 32
  dspark eval --run runs/nano --methods ar mtp-1 dspark --temperatures 1 --threads 2
  dspark eval --model ./Qwen3-8B --draft ./dspark_qwen3_8b_block7,./dflash_qwen3_8b_block7 \\
      --bench DeepSpec/eval_datasets/gsm8k.jsonl,DeepSpec/eval_datasets/mt-bench.jsonl --device cuda --dtype bf16

With --bench (chat benchmarks, DeepSpec's rules; every rule and its source in dspark/eval/bench.py):
each JSONL row's first turn is one user message rendered with the model's chat template (thinking
off), decoded at batch 1 with full blocks, T = 1, up to 2048 new tokens, seed 980406 (sample i:
980406 + i; DeepSpec's sample caps per known benchmark name). Columns: ar, ngram, mtp (when the
target has an MTP module) and one per --draft, its method read from its config.json; a method asked
for in --methods without its draft is left out with a note. Writes OUT/bench.json and OUT/bench.md.

Without --bench (a nano run):

Writes OUT/eval.json (every number and its definition), OUT/table.md (printed too), OUT/tau.png,
OUT/acceptance.png and OUT/traces.jsonl (one line per decode round, for a serving simulator).
End to end: prompts are the first P tokens of held-out files, M tokens generated at batch 1 with
full blocks, the same seeds for every method; τ (mean tokens per round, bonus included) with a 95%
bootstrap interval over files. Teacher-forced: the drafter proposes from the true prefix at every
anchor and the acceptance is computed exactly from the target and draft distributions. Speed is a
CPU wall-clock ratio against ar in the same run, not a GPU figure."""


def _comma_list(values: list[str] | None) -> list[str]:
    """Repeated and comma-separated values as one list (`--bench a.jsonl,b.jsonl --bench c.jsonl`)."""
    return [v for value in values or () for v in value.split(",") if v]


def cmd_eval(args) -> int:
    from dspark.eval import METHODS as EVAL_METHODS, EvalConfig, evaluate, markdown_table

    if args.threads < 0:
        raise ValueError(f"--threads must be >= 0, got {args.threads}")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.bench or args.model:
        return _eval_bench(args)
    if args.run is None:
        raise ValueError("eval needs --run DIR (a nano run) or --model DIR --bench FILE.jsonl (chat benchmarks)")
    methods = _comma_list(args.methods) or list(EVAL_METHODS)
    config = EvalConfig(files=args.files, prompt_tokens=args.prompt_tokens, max_tokens=args.max_tokens,
                        tf_tokens=args.tf_tokens, methods=tuple(methods), temperatures=tuple(args.temperatures),
                        seed=0 if args.seed is None else args.seed)
    out = Path(args.out) if args.out else Path(args.run) / "eval"
    results = evaluate(args.run, out, config, progress=not args.no_progress)
    print(markdown_table(results))
    print(f"wrote eval.json, table.md, tau.png, acceptance.png and traces.jsonl to {out}", file=sys.stderr)
    return 0


def _eval_bench(args) -> int:
    from dspark.eval.bench import BenchConfig, bench_table, evaluate_bench, load_models, write_outputs

    if args.run is not None:
        raise ValueError("--run (a nano run) and --model / --bench (chat benchmarks) exclude each other")
    if not args.model or not args.bench:
        raise ValueError("chat benchmarks need both --model DIR and --bench FILE.jsonl[,FILE...]")
    if not Path(args.model).is_dir():
        raise ValueError(f"--model: no checkpoint directory at {args.model}")
    benches, drafts = _comma_list(args.bench), _comma_list(args.draft)
    for name, paths, kind in (("--bench", benches, "file"), ("--draft", drafts, "directory")):
        missing = [p for p in paths if not (Path(p).is_file() if kind == "file" else Path(p).is_dir())]
        if missing:
            raise ValueError(f"{name}: no such {kind}: {', '.join(missing)}")
    config = BenchConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                         seed=980406 if args.seed is None else args.seed, max_samples=args.max_samples,
                         methods=tuple(_comma_list(args.methods)) or None, num_draft_tokens=args.num_draft_tokens,
                         enable_thinking=args.thinking)
    models = load_models(args.model, drafts, dtype=DTYPES[args.dtype], device=args.device, kernels=args.kernels)
    results = evaluate_bench(models, benches, config, progress=not args.no_progress)
    out = Path(args.out) if args.out else Path("bench-results")
    write_outputs(results, out)
    print(bench_table(results))
    print(f"wrote bench.json and bench.md to {out}", file=sys.stderr)
    return 0


PROFILE_EPILOG = """\
examples:
  dspark profile --out runs/profile                                  # nano, dspark, 4 users, CPU
  dspark profile --method mtp --concurrency 8 --rounds 50 --device cuda --dtype bf16 --out runs/prof-mtp
  NSYS_RECIPE

Open OUT/trace.json in https://ui.perfetto.dev or chrome://tracing. OUT/kernels.md ranks kernels (CUDA)
or top-level ops (CPU) by their time; OUT/summary.json holds per-round times and the idle gaps between
kernels (CUDA) or between top-level ops of the decoding thread (CPU), with what surrounds the largest."""


def cmd_profile(args) -> int:
    from dspark.profiling import ProfileConfig, profile

    if args.threads < 0:
        raise ValueError(f"--threads must be >= 0, got {args.threads}")
    if args.threads:
        torch.set_num_threads(args.threads)
    config = ProfileConfig(model=args.model or default_model(), method=args.method, scheduler=args.scheduler,
                           num_draft_tokens=args.num_draft_tokens, concurrency=args.concurrency, rounds=args.rounds,
                           warmup=args.warmup, temperature=args.temperature, device=args.device, dtype=args.dtype,
                           seed=args.seed, nsys=args.nsys, cuda_graphs=args.cuda_graphs)
    summary = profile(config, args.out, progress=not args.quiet)
    if not args.nsys:
        print((Path(args.out) / "kernels.md").read_text())
    else:
        print(f"median round {summary['median_round_ms']:.2f} ms", file=sys.stderr)
    return 0


SERVE_EPILOG = """\
examples:
  dspark serve --model nano --method dspark --port 8000
  dspark serve --model ./DeepSeek-V4-Flash --method mtp --device cuda --dtype bf16 --max-batch 32 --api-key KEY

  curl http://127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' \\
       -d '{"model": "nano", "prompt": "def fibonacci(n):", "max_tokens": 32, "temperature": 0}'

OpenAI-compatible endpoints: /v1/completions, /v1/chat/completions (both with stream), /v1/models,
/health, /metrics (Prometheus text). Requests join and leave the running batch between rounds; more
than --max-batch + --max-waiting requests in flight answer 429. Ctrl-C stops the server; requests
still running get an error."""


def cmd_serve(args) -> int:
    from dspark.serve import ServeConfig, Server
    from dspark.serve.app import PLAIN_CHAT_TEMPLATE, chat_template_of

    if args.threads < 0:
        raise ValueError(f"--threads must be >= 0, got {args.threads}")
    if args.max_waiting < 0:
        raise ValueError(f"--max-waiting must be >= 0, got {args.max_waiting}")
    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port must be in [0, 65535], got {args.port}")
    if args.threads:
        torch.set_num_threads(args.threads)
    model = args.model or default_model()
    llm = LLM(model, method=args.method, draft=args.draft, num_draft_tokens=args.num_draft_tokens, dtype=args.dtype,
              device=args.device, max_batch=args.max_batch, max_seq_len=args.max_seq_len, scheduler=args.scheduler,
              cuda_graphs=args.cuda_graphs, kernels=args.kernels)
    name = args.served_model_name or Path(str(model)).name
    config = ServeConfig(name, api_key=args.api_key, max_waiting=args.max_waiting,
                         default_max_tokens=args.default_max_tokens,
                         chat_template=chat_template_of(model) or PLAIN_CHAT_TEMPLATE)
    server = Server(llm, config, host=args.host, port=args.port, log_level=args.log_level)
    print(f"serving {name!r} ({llm.method}, scheduler {args.scheduler}) at {server.url}/v1", file=sys.stderr)
    server.serve_forever()
    return 0


PLAN_EPILOG = """\
examples:
  dspark plan --model ./DeepSeek-V4-Flash --gpus 8 --gpu-mem 141GB
  dspark plan --model ./DeepSeek-V4-Flash --gpus 4 --gpu-mem 80GB --max-seq-len 131072 --max-batch 16
  dspark plan --model ./DeepSeek-V4-Pro --gpus 16 --gpu-mem 141GB --tp 8 --ep 16

Reads config.json and the safetensors headers only (no weight data; header-only copies work). Weights
are counted as stored (FP8 / FP4 resident); today's loader dequantises to bf16, printed beside. Split:
attention heads and the shared expert by TP, routed experts by EP, embedding / LM head by vocabulary
(TP), the rest replicated; caches per rank for ceil(B / (N / TP)) requests. Workspace, CUDA-graph and
reserve figures are estimates, each said how in the output and in dspark/checkpoint/plan.py."""


def cmd_plan(args) -> int:
    from dspark.checkpoint.plan import format_plan, plan

    if not Path(args.model).is_dir():
        raise ValueError(f"--model: no checkpoint directory at {args.model}")
    print(format_plan(plan(args.model, gpus=args.gpus, gpu_mem=args.gpu_mem, max_batch=args.max_batch,
                           max_seq_len=args.max_seq_len, tp=args.tp, ep=args.ep, kv_dtype=args.kv_dtype,
                           draft_tokens=args.draft_tokens)))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="dspark", description="Lossless speculative decoding for DeepSeek-V4-class models.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    g = sub.add_parser(
        "generate", help="generate text from prompts", epilog=GENERATE_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Generate text from one or more prompts (several prompts run batched together).\n"
                    "Without --model the embedded nano model is used when the package ships it; otherwise\n"
                    "a preset with RANDOM weights, whose output is noise that only shows the stack runs.")
    source = g.add_mutually_exclusive_group()
    source.add_argument("--model", metavar="PATH",
                        help="checkpoint directory: a DeepSeek-V4 checkpoint (HF or upstream names, sharded "
                             "FP8/FP4 accepted) or a dense HF snapshot (Qwen3, Llama-3, Gemma 4), with tokenizer.json")
    source.add_argument("--preset", metavar="NAME",
                        help="nano (the embedded trained model, when shipped) or a random-weight preset such as "
                             "tiny or flash-proxy (default: nano if shipped, else tiny)")
    g.add_argument("--prompt", action="append", metavar="TEXT",
                   help=f"prompt text; repeat for several prompts (default: {DEFAULT_PROMPT!r})")
    g.add_argument("--prompt-file", action="append", metavar="FILE",
                   help="read one prompt from FILE ('-' for stdin); repeatable, combines with --prompt")
    g.add_argument("--chat", action="append", metavar="TEXT",
                   help="a user message, rendered with the checkpoint's chat template (needs --model DIR with "
                        "one); repeat for several conversations; excludes --prompt / --prompt-file")
    g.add_argument("--thinking", action=argparse.BooleanOptionalAction, default=None,
                   help="with --chat: pass enable_thinking=true/false to the template (Qwen3's thinking switch; "
                        "default: the template's own)")
    g.add_argument("--draft", metavar="DIR",
                   help="draft checkpoint directory of a draft method: a DeepSpec DSpark / DFlash / EAGLE-3 draft "
                        "(e.g. deepseek-ai/dspark_qwen3_8b_block7) or a V4 -DSpark release (default: the model's "
                        "drafts/<method>)")
    g.add_argument("--method", choices=list(METHODS),
                   help="decoding method: ar (plain autoregressive), mtp (the model's MTP module drafts), "
                        "ngram (prompt lookup), dspark / dflash / dflash-l1 / dspark-v4 / eagle3 (a trained draft: "
                        "--draft DIR, or one shipped next to the model); every method gives the same output "
                        "distribution (default: the --draft's method, read from its config.json; else ar)")
    g.add_argument("--scheduler", choices=SCHEDULERS,
                   default="fixed", help="how many drafted tokens each round verifies (confidence-based ones need "
                                         "a dspark draft; hardware / async profile SPS first) (default: fixed)")
    g.add_argument("--cuda-graphs", action="store_true",
                   help="replay decode rounds from CUDA graphs (needs --device cuda)")
    g.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False,
                   help="compile decode rounds with torch.compile (inductor, C++) on CPU: minutes for each new round "
                        "shape on the first run, read from inductor's cache ($TORCHINDUCTOR_CACHE_DIR, default "
                        "/tmp/torchinductor_$USER) afterwards (default: off)")
    g.add_argument("--kernels", choices=KERNELS, default="auto",
                   help="auto: Triton kernels on CUDA, PyTorch references elsewhere; ref: references everywhere "
                        "(to bisect a GPU mismatch); triton: kernels everywhere (on CPU only with "
                        "TRITON_INTERPRET=1, slow) (default: auto)")
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

    t = sub.add_parser(
        "train-draft", help="train a DSpark / DFlash draft for a target", epilog=TRAIN_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train a draft model on the target's own features (dspark.md §4): block anchors, the\n"
                    "CE + L1 + confidence loss, AdamW with warmup and cosine decay; optionally calibrate\n"
                    "its confidences with Sequential Temperature Scaling.")
    t.add_argument("--target", default="tiny", metavar="PATH|PRESET",
                   help="target checkpoint directory, or a random-weight preset such as tiny (default: tiny)")
    t.add_argument("--out", required=True, metavar="DIR", help="output directory (checkpoints, log, draft)")
    t.add_argument("--kind", choices=draft_methods(), default="dspark",
                   help="dspark (Markov + confidence heads), dflash (CE only), dflash-l1 (DFlash with the L1 "
                        "term), dspark-v4 (the V4 release layout; needs dspark_* target fields) (default: dspark)")
    t.add_argument("--layers", type=int, default=2, help="draft layers / V4 stages (default: 2)")
    t.add_argument("--block-size", type=int, default=7, help="γ, drafted tokens per block (default: 7)")
    t.add_argument("--markov-rank", type=int, default=64, help="rank of the Markov head (default: 64)")
    t.add_argument("--markov-head", choices=["vanilla", "gated", "rnn"], default="vanilla",
                   help="Markov head type (default: vanilla)")
    t.add_argument("--taps", metavar="L1,L2,...", help="target layers whose outputs feed the draft "
                                                       "(default: spread over the target, never the last)")
    t.add_argument("--data", action="append", metavar="PATH",
                   help="text files or directories (tokenized with the target's tokenizer); default: sequences "
                        "generated by the target itself from random prompts")
    t.add_argument("--sequences", type=int, default=64, help="self-generated sequences (default: 64)")
    t.add_argument("--seq-len", type=int, default=128, help="training window in tokens (default: 128)")
    t.add_argument("--steps", type=int, default=300, help="optimizer steps (default: 300)")
    t.add_argument("--batch-size", type=int, default=8, help="sequences per step (default: 8)")
    t.add_argument("--anchors", type=int, default=16, help="blocks per sequence (default: 16)")
    t.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (default: 3e-3)")
    t.add_argument("--seed", type=int, default=42, help="seed of data, anchors and init (default: 42)")
    t.add_argument("--checkpoint-every", type=int, default=100, help="steps between checkpoints (default: 100)")
    t.add_argument("--calibrate", type=int, default=0, metavar="N",
                   help="fit STS temperatures on rollouts of N held-out prompts (default: off)")
    t.add_argument("--no-resume", action="store_true", help="ignore an existing checkpoint in --out")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    t.add_argument("--threads", type=int, default=0, metavar="N", help="torch CPU threads (default: torch's)")
    t.set_defaults(func=cmd_train_draft)

    n = sub.add_parser(
        "train-nano", help="train the embedded default model from text on this machine",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Run (or resume) the nano recipe: corpus (stdlib code + manual pages / docs), BPE\n"
                    "tokenizer, a small V4 target with its MTP module, then DSpark, DFlash, DFlash+L1 and\n"
                    "V4-layout DSpark drafts with equal budgets and calibrated confidence heads. Every\n"
                    "stage resumes from OUT; the final weights hashes are printed (they repeat for the\n"
                    "same seed and thread count).",
        epilog="examples:\n  dspark train-nano --smoke --out /tmp/nano-smoke\n"
               "  dspark train-nano --out runs/nano --export dspark/assets/nano")
    n.add_argument("--out", required=True, metavar="DIR", help="run directory (resumed when it exists)")
    n.add_argument("--smoke", action="store_true", help="every stage at toy size (about a minute)")
    n.add_argument("--export", metavar="DIR", help="after a finished run, write the shippable model here")
    n.add_argument("--stop-after", type=int, metavar="STEPS", help="stop pretraining after STEPS steps of this call")
    n.add_argument("--threads", type=int, default=0, metavar="N", help="override the recipe's thread count")
    n.add_argument("--no-progress", action="store_true", help="no progress bars")
    n.set_defaults(func=cmd_train_nano)

    p = sub.add_parser(
        "sps", help="profile verify steps per second per batch size (the schedulers' SPS(B))",
        description="Time the target's verify forward with B tokens in flight (R requests with a committed\n"
                    "context) and print SPS(B). Results are cached per model, device and thread count under\n"
                    "~/.cache/dspark ($DSPARK_CACHE); the hardware / async schedulers use them (sps='auto').",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", default="tiny", metavar="PATH|PRESET", help="checkpoint directory or preset (default: tiny)")
    p.add_argument("--buckets", metavar="B1,B2,...", help="token counts to time (default: 1, 2, 3, 4, 6, 8, ...)")
    p.add_argument("--max-tokens", type=int, default=64, help="largest default bucket (default: 64)")
    p.add_argument("--requests", type=int, default=8, help="requests sharing the tokens (default: 8)")
    p.add_argument("--context", type=int, default=64, help="committed tokens per request (default: 64)")
    p.add_argument("--refresh", action="store_true", help="ignore the cache and measure again")
    p.add_argument("--seed", type=int, default=42, help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, default=0, metavar="N", help="torch CPU threads (default: torch's)")
    p.set_defaults(func=cmd_sps)

    from dspark.profiling import NSYS_RECIPE

    pr = sub.add_parser(
        "profile", help="profile decode rounds: Chrome trace, per-kernel table, idle gaps",
        epilog=PROFILE_EPILOG.replace("NSYS_RECIPE", NSYS_RECIPE),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Decode with C concurrent requests and profile N rounds after prefill and warm-up with the\n"
                    "PyTorch profiler (or, with --nsys, as NVTX ranges for Nsight Systems).")
    pr.add_argument("--out", required=True, metavar="DIR", help="output directory")
    pr.add_argument("--model", metavar="PATH|PRESET",
                    help="checkpoint directory or preset (default: the embedded nano model)")
    pr.add_argument("--method", default="dspark", choices=list(METHODS),
                    help="decoding method (default: dspark)")
    pr.add_argument("--scheduler", default="fixed", choices=list(SCHEDULERS), help="verify scheduler (default: fixed)")
    pr.add_argument("--num-draft-tokens", type=int, metavar="K", help="tokens drafted per round (default: the method's)")
    pr.add_argument("--concurrency", type=int, default=4, metavar="C", help="requests decoding at once (default: 4)")
    pr.add_argument("--rounds", type=int, default=20, metavar="N", help="profiled decode rounds (default: 20)")
    pr.add_argument("--warmup", type=int, default=3, metavar="N", help="decode rounds before profiling (default: 3)")
    pr.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (default: 1)")
    pr.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default: cpu)")
    pr.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="weight dtype (default: fp32)")
    pr.add_argument("--seed", type=int, default=0, help="request i samples with seed + i (default: 0)")
    pr.add_argument("--cuda-graphs", action="store_true", help="replay decode rounds from CUDA graphs")
    pr.add_argument("--nsys", action="store_true", help="NVTX ranges and cudaProfilerStart/Stop for Nsight Systems")
    pr.add_argument("--threads", type=int, default=0, metavar="N", help="torch CPU threads (default: torch's)")
    pr.add_argument("--quiet", action="store_true", help="no progress lines")
    pr.set_defaults(func=cmd_profile)

    sv = sub.add_parser(
        "serve", help="an OpenAI-compatible HTTP server (continuous batching, streaming, metrics)",
        epilog=SERVE_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Serve a model over HTTP with the OpenAI API: one engine thread decodes every request\n"
                    "in flight with the chosen method, and requests join and leave its batch between rounds.")
    sv.add_argument("--model", metavar="DIR|nano",
                    help="checkpoint directory, nano (the embedded model) or a random-weight preset such as tiny "
                         "(default: nano if shipped, else tiny)")
    sv.add_argument("--method", choices=list(METHODS),
                    help="decoding method; every method gives the same output distribution (default: the --draft's "
                         "method, read from its config.json; else ar)")
    sv.add_argument("--draft", metavar="DIR",
                    help="the trained draft of a block method (default: the model's drafts/<method>)")
    sv.add_argument("--scheduler", choices=SCHEDULERS, default="fixed",
                    help="how many drafted tokens each round verifies; hardware / async profile SPS at start-up "
                         "(default: fixed)")
    sv.add_argument("--num-draft-tokens", type=int, metavar="K", help="tokens drafted per round (default: the method's)")
    sv.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    sv.add_argument("--port", type=int, default=8000, help="port to listen on; 0 picks a free one (default: 8000)")
    sv.add_argument("--max-batch", type=int, default=8, metavar="N", help="requests decoding at once (default: 8)")
    sv.add_argument("--max-seq-len", type=int, metavar="N",
                    help="positions per request, prompt + output (default: min(the model's, 4096))")
    sv.add_argument("--max-waiting", type=int, default=64, metavar="N",
                    help="requests queued beyond the running batch; more answer 429 (default: 64)")
    sv.add_argument("--default-max-tokens", type=int, default=256, metavar="N",
                    help="max_tokens of a chat request that sets none (default: 256)")
    sv.add_argument("--api-key", metavar="KEY", help="require 'Authorization: Bearer KEY' on /v1/ (401 otherwise)")
    sv.add_argument("--served-model-name", metavar="NAME",
                    help="the model name clients must send (default: the --model directory's name)")
    sv.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="weight dtype (default: fp32)")
    sv.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default: cpu)")
    sv.add_argument("--kernels", choices=KERNELS, default="auto", help="kernel implementation (default: auto)")
    sv.add_argument("--cuda-graphs", action="store_true", help="replay decode rounds from CUDA graphs")
    sv.add_argument("--threads", type=int, default=0, metavar="N",
                    help="torch CPU threads; 0 keeps torch's default (default: 0)")
    sv.add_argument("--log-level", default="warning", choices=["critical", "error", "warning", "info", "debug"],
                    help="uvicorn's log level (default: warning)")
    sv.set_defaults(func=cmd_serve)

    from dspark.eval import METHODS as EVAL_METHODS

    from dspark.eval.bench import BENCH_METHODS

    e = sub.add_parser(
        "eval", help="acceptance tables: a nano run's held-out text, or chat benchmarks (DeepSpec's rules)",
        epilog=EVAL_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="--run DIR: measure every drafting method of a nano run (dspark train-nano) on held-out\n"
                    "code and prose: end-to-end generation through the engine and teacher-forced acceptance on\n"
                    "the true text, at each temperature. mtp-k and ngram draft k tokens, k = the DSpark block\n"
                    "size.\n"
                    "--model DIR --bench FILE.jsonl: τ per benchmark and method on a real checkpoint and its\n"
                    "drafts, with DeepSpec's evaluation rules (its JSONL files, prompts and defaults).")
    e.add_argument("--run", metavar="DIR", help="a finished nano run directory")
    e.add_argument("--out", metavar="DIR",
                   help="output directory (default: RUN/eval; with --bench: ./bench-results)")
    e.add_argument("--files", type=int, default=16, metavar="N",
                   help="held-out files (prompts) per domain (default: 16)")
    e.add_argument("--prompt-tokens", type=int, default=128, metavar="P",
                   help="prompt = the first P tokens of each file (default: 128)")
    e.add_argument("--max-tokens", type=int, default=128, metavar="M",
                   help="tokens generated per prompt (default: 128)")
    e.add_argument("--tf-tokens", type=int, default=512, metavar="N",
                   help="teacher-forced span: each file's first N tokens (default: 512)")
    e.add_argument("--methods", nargs="+", metavar="METHOD",
                   help=f"methods to compare, space- or comma-separated; a nano run: some of "
                        f"{' '.join(EVAL_METHODS)} (default: all); --bench: some of {' '.join(BENCH_METHODS)} "
                        f"(default: ar, ngram, mtp where the target has it, and every --draft's method)")
    e.add_argument("--temperatures", nargs="+", type=float, default=[0.0, 1.0], metavar="T",
                   help="sampling temperatures; 0 is greedy (default: 0 1)")
    e.add_argument("--seed", type=int, metavar="S",
                   help="sampling seeds (file / sample i uses S + i) and the bootstrap's seed (default: 0; "
                        "with --bench 980406, DeepSpec's, which also picks its sample subsets)")
    b = e.add_argument_group("chat benchmarks (--model DIR --bench FILE.jsonl)")
    b.add_argument("--model", metavar="DIR",
                   help="target checkpoint directory with tokenizer.json and a chat template (e.g. a downloaded "
                        "Qwen/Qwen3-8B snapshot, or a DeepSeek-V4 checkpoint)")
    b.add_argument("--draft", action="append", metavar="DIR[,DIR...]",
                   help="draft checkpoint directories, comma-separated or repeated; each one's method (dspark, "
                        "dflash, dspark-v4, ...) is read from its config.json")
    b.add_argument("--bench", action="append", metavar="FILE[,FILE...]",
                   help="benchmark files in DeepSpec's eval_datasets JSONL format ({\"turns\": [...]} per line; "
                        "the first turn is the prompt), comma-separated or repeated; named by file stem")
    b.add_argument("--max-new-tokens", type=int, default=2048, metavar="N",
                   help="most tokens generated per sample (default: 2048, DeepSpec's)")
    b.add_argument("--temperature", type=float, default=1.0, metavar="T",
                   help="sampling temperature (default: 1, DeepSpec's)")
    b.add_argument("--max-samples", type=int, metavar="N",
                   help="samples per benchmark, a seeded random subset (default: DeepSpec's cap per known "
                        "benchmark name, e.g. gsm8k 500, mt-bench 80; every row of other files)")
    b.add_argument("--num-draft-tokens", type=int, metavar="K",
                   help="tokens drafted per round by ngram and mtp (default: theirs; drafts use their block)")
    b.add_argument("--thinking", action=argparse.BooleanOptionalAction, default=False,
                   help="render prompts with enable_thinking=true (default: false, as DeepSpec)")
    b.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="weight dtype (default: fp32)")
    b.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default: cpu)")
    b.add_argument("--kernels", choices=KERNELS, default="auto", help="kernel implementation (default: auto)")
    e.add_argument("--threads", type=int, default=0, metavar="N",
                   help="torch CPU threads; 0 keeps torch's default (default: 0)")
    e.add_argument("--no-progress", action="store_true", help="no progress bar")
    e.set_defaults(func=cmd_eval)

    pl = sub.add_parser(
        "plan", help="memory plan of a checkpoint on N GPUs (weights, caches, draft), from headers only",
        epilog=PLAN_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Print per-rank weight bytes, KV-cache and compressed-entry bytes per token and at\n"
                    "batch x length, draft bytes, workspace / CUDA-graph estimates, whether it fits, and the\n"
                    "smallest GPU counts that fit on 80 GB and 141 GB parts. Nothing is loaded.")
    pl.add_argument("--model", required=True, metavar="DIR",
                    help="checkpoint directory: config.json + model.safetensors or an index with shards")
    pl.add_argument("--gpus", type=int, required=True, metavar="N", help="GPUs (ranks) to plan for")
    pl.add_argument("--gpu-mem", required=True, metavar="SIZE",
                    help="memory per GPU: 141GB, 80GB (10^9 bytes) or 80GiB (2^30 bytes)")
    pl.add_argument("--max-seq-len", type=int, metavar="N",
                    help="positions per request, prompt + output (default: the model's max_position_embeddings)")
    pl.add_argument("--max-batch", type=int, default=1, metavar="B", help="requests decoding at once (default: 1)")
    pl.add_argument("--tp", type=int, metavar="T",
                    help="tensor-parallel degree of attention, shared expert and vocabulary; divides N and the "
                         "head / group counts (default: gcd(N, o_groups, index_n_heads))")
    pl.add_argument("--ep", type=int, metavar="E", help="expert-parallel degree; divides N (default: N)")
    pl.add_argument("--kv-dtype", choices=["bf16", "fp32"], default="bf16", help="cache dtype (default: bf16)")
    pl.add_argument("--draft-tokens", type=int, default=8, metavar="K",
                    help="tokens drafted per round: sizes the rings' rollback room and the verify step (default: 8)")
    pl.set_defaults(func=cmd_plan)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, TypeError, OSError) as e:  # bad values and types, missing files: one line, no traceback
        print(f"error: {' '.join(str(e).splitlines())}", file=sys.stderr)  # one line, whatever the message holds
        return 1
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
