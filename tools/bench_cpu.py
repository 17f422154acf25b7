#!/usr/bin/env python3
"""dspark against HF transformers' own `generate` on this CPU, same weights, same run.

The peer a PyTorch user would otherwise pick on a CPU is `transformers`' `model.generate`. This loads
one target twice — into dspark and into transformers' class for its family (DeepseekV4ForCausalLM for
the embedded nano model; the dense families from an HF snapshot with `--model DIR`) — and times, in one
process, interleaved (every repeat runs every system once, in a rotated order, so drift and noise
spread evenly):

    hf            HF `generate`, greedy (do_sample=False), KV cache on
    hf-lookup     HF prompt lookup decoding (`prompt_lookup_num_tokens`), dense families only: HF
                  refuses speculation on V4 ("stateful model")
    dspark <m>    dspark's engine with each method m (ar, ngram, mtp, dspark, ...), greedy, batch B
    dspark <m> (compiled)   the same with decode rounds compiled by inductor (`--compile`; the compile
                  happens in the untimed token check, and its artifacts are cached on disk, see
                  dspark/decode/compiled.py)

Before any timing, each system's greedy tokens are checked against HF greedy's (a system whose tokens
differ is reported with the first differing position and left out of the ratios: a speed figure for
different text is no figure). Prompts: the first P tokens of the first held-out code files of the model's
corpus (the same P for all, so a batch needs no padding), no stop token, exactly N new tokens each.
Figures: tokens/s = B·N / seconds, the median over repeats; with 1 thread seconds are the thread's CPU
time (robust to other processes on a shared machine), with more threads wall time. Ratios are against
`hf` of the same threads and batch. CPU figures of this machine only: they say nothing about a GPU.

    python tools/bench_cpu.py --out bench/results/cpu-peers                 # nano, 1 and 2 threads, B = 1, 8
    python tools/bench_cpu.py --model ~/models/Qwen3-0.6B --methods ar,ngram --batch 1
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

from dspark import checkpoint
from dspark.data.corpus import CorpusSources
from dspark.decode import generate
from dspark.llm import PACKAGED
from dspark.text import load_tokenizer

NANO = PACKAGED["nano"]


def hf_twin(target, model_dir: Path | None):
    """The same weights in transformers' own class, fp32, eval mode."""
    import transformers

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if model_dir is not None:  # an HF snapshot: transformers reads it itself
            return transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        hf = transformers.DeepseekV4ForCausalLM(transformers.DeepseekV4Config(**checkpoint.config_to_dict(target.config)))
    state = {k: v.float() for k, v in target.state_dict().items() if not k.startswith("mtp.")}
    hf.load_state_dict(state, strict=True)
    return hf.eval()


def prompts_from(paths, tokenizer_dir: Path, count: int, length: int) -> list[list[int]]:
    """The first `length` tokens (the checkpoint's own tokenizer) of the first `count` files long enough."""
    tok = load_tokenizer(tokenizer_dir)
    prompts = []
    for path in paths:
        ids = tok.encode(path.read_text(errors="replace"))
        if len(ids) >= length:
            prompts.append(ids[:length])
        if len(prompts) == count:
            return prompts
    raise SystemExit(f"error: only {len(prompts)} files with {length} tokens found on this machine")


def nano_files() -> list[Path]:
    """The nano corpus's held-out code files (manifest order), read from this machine's standard library."""
    manifest = json.loads((NANO / "corpus_manifest.json").read_text())
    stdlib = CorpusSources.default().stdlib
    paths = (stdlib / d["relpath"].removeprefix("stdlib/") for d in manifest["documents"]
             if d["split"] == "heldout" and d["source"] == "stdlib")
    return [p for p in paths if p.exists()]


def systems(target, hf, drafts: dict, methods: list[str], dense: bool, new_tokens: int, lookup: int,
            compile: bool = False):
    """name → function(prompts [B lists]) → list of B token lists (new tokens only)."""

    def hf_run(prompts, **extra):
        ids = torch.tensor(prompts)
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                              min_new_tokens=new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0, **extra)
        return out[:, ids.shape[1]:].tolist()

    table = {"hf": hf_run}
    if dense:
        table["hf-lookup"] = lambda prompts: hf_run(prompts, prompt_lookup_num_tokens=lookup)

    def engine_run(method, compiled):
        def go(prompts):
            with torch.no_grad():
                results = generate(target, prompts, method=method, draft=drafts.get(method),
                                   max_new_tokens=new_tokens, max_batch=len(prompts),
                                   max_seq_len=len(prompts[0]) + new_tokens + 16, compile=compiled)
            return [r.token_ids for r in results]
        return go

    for m in methods:
        table[f"dspark {m}"] = engine_run(m, False)
        if compile:
            table[f"dspark {m} (compiled)"] = engine_run(m, True)
    return table


def first_difference(a: list[list[int]], b: list[list[int]]) -> str | None:
    for i, (x, y) in enumerate(zip(a, b)):
        for j, (u, v) in enumerate(zip(x, y)):
            if u != v:
                return f"prompt {i}, token {j}"
        if len(x) != len(y):
            return f"prompt {i}, length {len(x)} vs {len(y)}"
    return None


def measure(table: dict, prompts: list[list[int]], repeats: int, clock) -> tuple[dict, dict]:
    """Greedy tokens checked against `hf` first, then interleaved timed repeats → (tok/s medians, mismatches)."""
    reference = table["hf"](prompts)
    mismatch = {}
    for name, run in table.items():
        if name != "hf":
            where = first_difference(run(prompts), reference)
            if where is not None:
                mismatch[name] = where
    names = [n for n in table if n not in mismatch]
    seconds = {n: [] for n in names}
    for r in range(repeats):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            start = clock()
            table[name](prompts)
            seconds[name].append(clock() - start)
    tokens = sum(len(p) for p in reference)
    return {n: tokens / statistics.median(s) for n, s in seconds.items()}, mismatch


def markdown(rows: list[dict], names: list[str]) -> str:
    head = "| threads | batch | " + " | ".join(names) + " |\n|---|---|" + "---|" * len(names) + "\n"
    body = ""
    for row in rows:
        cells = []
        for n in names:
            if n in row["mismatch"]:
                cells.append(f"tokens differ ({row['mismatch'][n]})")
            elif n in row["tok_s"]:
                ratio = row["tok_s"][n] / row["tok_s"]["hf"]
                cells.append(f"{ratio:.2f}× ({row['tok_s'][n]:.1f} tok/s)")
            else:
                cells.append("—")
        body += f"| {row['threads']} | {row['batch']} | " + " | ".join(cells) + " |\n"
    return head + body


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", metavar="DIR", help="an HF snapshot of a dense family (default: the embedded nano model)")
    ap.add_argument("--methods", default=None, help="dspark methods to time (default nano: ar,ngram,mtp,dspark,"
                    "dspark-v4; a snapshot: ar,ngram)")
    ap.add_argument("--threads", default="1,2", help="torch thread counts (default: 1,2)")
    ap.add_argument("--batch", default="1,8", help="batch sizes (default: 1,8)")
    ap.add_argument("--prompt-tokens", type=int, default=64, help="prompt length in tokens (default: 64)")
    ap.add_argument("--new-tokens", type=int, default=128, help="tokens generated per prompt (default: 128)")
    ap.add_argument("--repeats", type=int, default=5, help="timed repeats per system; the median counts (default: 5)")
    ap.add_argument("--lookup", type=int, default=4, help="HF prompt_lookup_num_tokens (default: 4)")
    ap.add_argument("--compile", action="store_true",
                    help="also time each method with decode rounds compiled by inductor (EngineConfig.compile)")
    ap.add_argument("--out", metavar="DIR", help="write results.json and table.md here")
    args = ap.parse_args(argv)

    model_dir = Path(args.model).expanduser() if args.model else None
    if model_dir is None:
        target = checkpoint.load_target(NANO / "target").eval()
        drafts = {m: checkpoint.load_draft(NANO / "drafts" / m, target) for m in ("dspark", "dspark-v4", "dflash")
                  if (NANO / "drafts" / m).is_dir()}
        methods = (args.methods or "ar,ngram,mtp,dspark,dspark-v4").split(",")
    else:
        target, drafts = checkpoint.load_target(model_dir).eval(), {}
        methods = (args.methods or "ar,ngram").split(",")
    hf = hf_twin(target, model_dir)
    dense = model_dir is not None
    batches = [int(b) for b in args.batch.split(",")]
    files = nano_files() if model_dir is None else sorted(CorpusSources.default().stdlib.glob("*.py"))
    prompts_all = prompts_from(files, NANO / "target" if model_dir is None else model_dir, max(batches),
                               args.prompt_tokens)
    table = systems(target, hf, drafts, methods, dense, args.new_tokens, args.lookup, args.compile)

    rows = []
    for threads in [int(t) for t in args.threads.split(",")]:
        torch.set_num_threads(threads)
        clock = time.thread_time if threads == 1 else time.perf_counter
        for b in batches:
            print(f"threads {threads}, batch {b} ...", file=sys.stderr)
            tok_s, mismatch = measure(table, prompts_all[:b], args.repeats, clock)
            rows.append(dict(threads=threads, batch=b, tok_s=tok_s, mismatch=mismatch))
    text = markdown(rows, list(table))
    print(text)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        meta = dict(model=str(model_dir or "nano"), methods=methods, compile=args.compile,
                    prompt_tokens=args.prompt_tokens,
                    new_tokens=args.new_tokens, repeats=args.repeats, torch=torch.__version__,
                    command=" ".join(sys.argv))
        (out / "results.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=2) + "\n")
        (out / "table.md").write_text(f"`{meta['command']}`\n\n" + text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
