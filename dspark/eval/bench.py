"""`dspark eval --bench`: acceptance length τ of each decoding method on chat benchmarks, by the
rules of DeepSpec's evaluation (commit afdfa7c: eval.py, deepspec/eval/base_evaluator.py,
deepspec/data/parser.py), run through dspark's own engine.

Rules, each with where it comes from:

- Files: JSONL, one object per line with a non-empty list of strings `turns`; blank lines skipped;
  only the FIRST turn is used (base_evaluator.load_and_process_dataset: `row["turns"] = turns[:1]`).
  A benchmark's name is its file's stem (DeepSpec loads `eval_datasets/<name>.jsonl`).
- Samples: DeepSpec caps each task (eval.py TASKS, `TASK_SAMPLES` here; files not listed there are
  used whole); when a file holds more rows than its cap, the rows are shuffled with
  `random.Random(seed)` and the first `cap` kept (base_evaluator.run_dataset). `max_samples`
  replaces the cap for every file.
- Prompt: the one message `{"role": "user", "content": turns[0]}` (no system message), rendered
  with the target checkpoint's own chat template, `add_generation_prompt=True`,
  `enable_thinking=False`, and encoded without adding special tokens (run_dataset →
  parser.encode_chat_messages: apply_chat_template(tokenize=False), then
  tokenizer(..., add_special_tokens=False)). dspark.text.ChatTemplate does exactly that.
- Decoding: temperature 1, at most 2048 new tokens, batch 1, the full draft block every round
  (eval.py defaults: --temperature 1.0, --max-new-tokens 2048, --confidence-threshold 0.0, which
  means no early stop; the loop asserts bsz = 1). dspark: the `fixed` scheduler, one request at a
  time; mtp and ngram (not in DeepSpec) draft `num_draft_tokens`, default their registry's.
- Stop tokens: generation_config.json's eos_token_id, an int or a list, all of them
  (resolve_stop_token_ids). dspark adds tokenizer_config.json's eos_token and config.json's
  eos_token_id (for Qwen3-8B all three are within generation_config's [151645, 151643]).
- Seeds: seed 980406 (eval.py --seed); sample idx (its place after the cap) decodes with seed +
  idx for every method (run_dataset: `seed_all(seed + idx)`). dspark seeds each request instead
  of the global RNG, so the drawn tokens differ from DeepSpec's; their distribution does not.
- τ: DeepSpec's acceptance_length = Σ per-round acceptance length / #rounds over all rounds of all
  samples, where a round's length is accepted drafts + 1 (the bonus), or just the accepted drafts
  when an accepted draft is a stop token (verify_draft_tokens, build_metrics_row); the token
  sampled at prefill is no round. That is dspark's `RequestStats.emitted` / `rounds`. Its 95%
  interval is a percentile bootstrap over samples (dspark.eval.stats.bootstrap_ci, seeded).
  Also reported: accept_rate@i = #rounds with accepted > i / #rounds with ℓ > i (DeepSpec's
  per-position rates; DeepSpec counts ℓ only up to an accepted stop token, dspark the verified ℓ).

Methods: `ar`, `ngram`, `mtp` (the target's MTP module, when it has one) and one column per draft
given; a draft's method comes from the model `dspark.checkpoint.load_draft` built from its
config.json (`draft_method`), never from its path. A requested method without its draft or MTP
module is left out with a note in the table and the JSON.
Outputs (`write_outputs`): bench.json (every number, the config, the notes) and bench.md (the table).
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from dspark import checkpoint
from dspark.config import EngineConfig, SamplingParams
from dspark.decode import Engine, collect
from dspark.decode.methods import METHODS, draft_method
from dspark.decode.stats import RequestStats
from dspark.eval.report import json_safe
from dspark.eval.stats import bootstrap_ci, ratio
from dspark.text import ChatTemplate, Tokenizer, load_tokenizer, no_chat_template

# eval.py TASKS: samples per benchmark (a random subset of that size when a file holds more).
TASK_SAMPLES = {"gsm8k": 500, "math500": 500, "aime25": 30, "humaneval": 164, "mbpp": 256, "livecodebench": 500,
                "mt-bench": 80, "alpaca": 500, "arena-hard-v2": 500}
# Table columns, baselines first; a method the registry does not have (yet) is never offered.
COLUMN_ORDER = ("ar", "ngram", "mtp", "eagle3", "dflash", "dflash-l1", "dspark", "dspark-v4")
BENCH_METHODS = tuple(m for m in COLUMN_ORDER if m in METHODS)


@dataclass(frozen=True)
class BenchConfig:
    max_new_tokens: int = 2048  # eval.py --max-new-tokens
    temperature: float = 1.0  # eval.py --temperature
    seed: int = 980406  # eval.py --seed: the cap's shuffle, sample idx decodes with seed + idx, the bootstrap
    max_samples: int | None = None  # None: TASK_SAMPLES' cap for known names, else every row
    methods: tuple[str, ...] | None = None  # None: ar, ngram, mtp where the target has it, every draft given
    num_draft_tokens: int | None = None  # γ of ngram / mtp (None: the registry's default)
    enable_thinking: bool | None = False  # run_dataset renders with enable_thinking=False
    resamples: int = 1000  # bootstrap resamples

    def __post_init__(self):
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens!r}")
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature!r}")
        if self.max_samples is not None and self.max_samples < 1:
            raise ValueError(f"max_samples must be >= 1, got {self.max_samples!r}")
        if self.methods is not None:
            bad = [m for m in self.methods if m not in BENCH_METHODS]
            if bad or not self.methods or len(set(self.methods)) != len(self.methods):
                raise ValueError(f"methods {list(self.methods)}: expected distinct names among "
                                 f"{', '.join(BENCH_METHODS)}")


@dataclass
class BenchModels:
    """The target with its tokenizer and chat template, and the drafts by detected method."""

    target: object
    tokenizer: Tokenizer
    chat_template: ChatTemplate
    drafts: dict[str, tuple[Path, object]]  # method → (directory, draft model)
    model_dir: Path


def load_models(model_dir: str | Path, draft_dirs=(), *, dtype: torch.dtype = torch.float32,
                device: str = "cpu", kernels: str = "auto") -> BenchModels:
    """Target, tokenizer, chat template (required: the prompts are chat) and drafts (by method)."""
    model_dir = Path(model_dir)
    tokenizer = load_tokenizer(model_dir)
    template = ChatTemplate.of_checkpoint(model_dir, tokenizer)
    if template is None:
        raise ValueError(no_chat_template(model_dir) + "; benchmark prompts are chats")
    target = checkpoint.load_target(model_dir, dtype=dtype, device=device, kernels=kernels)
    drafts: dict[str, tuple[Path, object]] = {}
    for d in map(Path, draft_dirs):
        draft = checkpoint.load_draft(d, target, dtype=dtype, device=device, kernels=kernels)
        method = draft_method(draft)
        if method in drafts:
            raise ValueError(f"--draft: {drafts[method][0]} and {d} are both {method} drafts; give one per method")
        drafts[method] = (d, draft)
    return BenchModels(target, tokenizer, template, drafts, model_dir)


def read_bench(path: str | Path) -> list[str]:
    """The first turn of every row of a DeepSpec-format JSONL file."""
    path = Path(path)
    prompts = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"--bench: cannot read {path} ({e})") from None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{number}: not JSON ({e})") from None
        turns = row.get("turns") if isinstance(row, dict) else None
        if not (isinstance(turns, list) and turns and all(isinstance(t, str) for t in turns)):
            raise ValueError(f"{path}:{number}: needs a non-empty list of strings `turns`")
        prompts.append(turns[0])
    if not prompts:
        raise ValueError(f"{path}: no rows")
    return prompts


def select_samples(prompts: list[str], cap: int | None, seed: int) -> list[str]:
    """DeepSpec's subset: every row, or when there are more than `cap`, the first `cap` after a
    `random.Random(seed)` shuffle."""
    if cap is None or len(prompts) <= cap:
        return list(prompts)
    shuffled = list(prompts)
    random.Random(seed).shuffle(shuffled)
    return shuffled[:cap]


def plan_methods(models: BenchModels, config: BenchConfig) -> tuple[list[str], list[str]]:
    """(methods to run in column order, notes on what is left out and why)."""
    has_mtp = bool(getattr(models.target, "has_mtp", False))
    wanted = config.methods or tuple(m for m in BENCH_METHODS if m in ("ar", "ngram") or m in models.drafts
                                     or (m == "mtp" and has_mtp))
    run, notes = [], []
    for m in BENCH_METHODS:
        if m not in wanted:
            if m in models.drafts:
                notes.append(f"{m}: draft {models.drafts[m][0]} given but {m} is not among --methods")
            continue
        if METHODS[m].needs_draft and m not in models.drafts:
            notes.append(f"{m}: left out, no {m} draft given (--draft)")
        elif METHODS[m].needs_mtp and not has_mtp:
            notes.append(f"{m}: left out, the target has no MTP module")
        else:
            run.append(m)
    return run, notes


def _progress_bar(total: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="bench", unit="sample", disable=not enabled, dynamic_ncols=True)


def evaluate_bench(models: BenchModels, bench_files, config: BenchConfig = BenchConfig(), *,
                   progress: bool = True) -> dict:
    """τ per benchmark and method (module docstring); the dict that bench.json holds."""
    methods, notes = plan_methods(models, config)
    if not bench_files:
        raise ValueError("no benchmark files given")
    benches = []
    for f in map(Path, bench_files):
        cap = config.max_samples if config.max_samples is not None else TASK_SAMPLES.get(f.stem)
        rows = read_bench(f)
        benches.append((f, len(rows), select_samples(rows, cap, config.seed)))
    kwargs = {} if config.enable_thinking is None else {"enable_thinking": config.enable_thinking}
    prompts = {f: [models.chat_template.encode([{"role": "user", "content": q}], **kwargs) for q in qs]
               for f, _, qs in benches}
    eos = tuple(dict.fromkeys((*getattr(models.target.config, "eos_token_ids", ()), *models.tokenizer.eos_token_ids)))
    if not methods:
        raise ValueError("nothing to evaluate: " + "; ".join(notes))
    gammas = {m: METHODS[m].draft_tokens(models.drafts.get(m, (None, None))[1], _requested(m, config))[0]
              for m in methods}
    longest = max(len(p) for ps in prompts.values() for p in ps)
    max_seq_len = longest + config.max_new_tokens + max(gammas.values()) + 1
    limit = models.target.config.max_position_embeddings
    if max_seq_len > limit:
        raise ValueError(f"the longest prompt ({longest} tokens) + max_new_tokens {config.max_new_tokens} + a draft "
                         f"block ({max(gammas.values()) + 1}) = {max_seq_len} positions exceed the target's {limit}")
    engines = {m: Engine(models.target, m, draft=models.drafts.get(m, (None, None))[1],
                         config=EngineConfig(max_batch=1, max_seq_len=max_seq_len, scheduler="fixed",
                                             num_draft_tokens=_requested(m, config)))
               for m in methods}
    bar = _progress_bar(sum(len(qs) for _, _, qs in benches) * len(methods), progress)
    rows = []
    try:
        for f, total, _ in benches:
            stats = {m: [] for m in methods}
            for idx, prompt in enumerate(prompts[f]):
                bar.set_postfix_str(f"{f.stem} {idx + 1}/{len(prompts[f])}")
                params = SamplingParams(temperature=config.temperature, seed=config.seed + idx, stop_token_ids=eos,
                                        max_tokens=config.max_new_tokens)
                for m, engine in engines.items():  # methods take turns on each prompt
                    (result,) = collect(engine, [prompt], [params])
                    stats[m].append(result.stats)
                    bar.update(1)
            rows.append({"benchmark": f.stem, "file": str(f), "rows": total, "samples": len(prompts[f]),
                         "methods": {m: _summary(stats[m], gammas[m], config) for m in methods}})
    finally:
        bar.close()
    return {"config": asdict(config), "target": str(models.model_dir),
            "drafts": {m: str(d) for m, (d, _) in models.drafts.items()}, "methods": methods,
            "num_draft_tokens": gammas, "notes": notes, "benchmarks": rows}


def _requested(method: str, config: BenchConfig) -> int | None:
    """num_draft_tokens of a method: a trained draft drafts (and verifies) its whole block, ar none."""
    return None if method == "ar" or METHODS[method].needs_draft else config.num_draft_tokens


def _summary(per_sample: list[RequestStats], gamma: int, config: BenchConfig) -> dict:
    emitted = [sum(s.emitted) for s in per_sample]
    rounds = [s.rounds for s in per_sample]
    pooled = RequestStats(proposal_lens=[ell for s in per_sample for ell in s.proposal_lens],
                          accepted=[a for s in per_sample for a in s.accepted])
    return {"tau": ratio(emitted, rounds), "tau_ci": list(bootstrap_ci(emitted, rounds, seed=config.seed,
                                                                       resamples=config.resamples)),
            "rounds": sum(rounds), "generated_tokens": sum(s.generated_tokens for s in per_sample),
            "proposed_per_round": ratio(pooled.proposal_lens, rounds),
            "accept_rate_by_position": pooled.prefix_survival(), "num_draft_tokens": gamma}


def bench_table(results: dict) -> str:
    """One row per benchmark, one τ [95% CI] column per method, then the notes."""
    methods = results["methods"]
    lines = ["| benchmark | samples | " + " | ".join(methods) + " |", "|---|---|" + "---|" * len(methods)]
    for row in results["benchmarks"]:
        cells = []
        for m in methods:
            s = row["methods"][m]
            lo, hi = s["tau_ci"]
            cells.append("—" if s["tau"] != s["tau"] else f"{s['tau']:.2f} [{lo:.2f}, {hi:.2f}]")
        lines.append(f"| {row['benchmark']} | {row['samples']} | " + " | ".join(cells) + " |")
    cfg = results["config"]
    gammas = ", ".join(f"{m} {g}" for m, g in results["num_draft_tokens"].items() if m != "ar")
    lines.append(f"\nτ = tokens per verify round, bonus included (DeepSpec's accept_len), 95% bootstrap interval "
                 f"over samples; T = {cfg['temperature']:g}, at most {cfg['max_new_tokens']} new tokens, batch 1, "
                 f"full blocks, seed {cfg['seed']}" + (f"; drafted per round: {gammas}" if gammas else "") + ".")
    lines += [f"- {note}" for note in results["notes"]]
    return "\n".join(lines)


def write_outputs(results: dict, out_dir: str | Path) -> None:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(json_safe(results), indent=1) + "\n")
    (out / "bench.md").write_text(bench_table(results) + "\n")


__all__ = ["BENCH_METHODS", "TASK_SAMPLES", "BenchConfig", "BenchModels", "bench_table",
           "evaluate_bench", "load_models", "plan_methods", "read_bench", "select_samples", "write_outputs"]
