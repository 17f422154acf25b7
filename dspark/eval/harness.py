"""`dspark eval`: an acceptance table for every drafting method of a nano run, on held-out text.

Methods: `ar`, `ngram` (prompt lookup), `mtp-1`, `mtp-k` (the target's MTP chained k times),
`dflash`, `dflash-l1` (DFlash trained with the L1 term), `dspark` (DeepSpec layout) and
`dspark-v4` (V4 layout). k, and the n-gram proposal length, is the DSpark block size of the run.
Files: the first `files` held-out documents per domain in a fixed hash order of their relpaths,
among those long enough for the prompt and the teacher-forced warm-up; prompt i is seeded
`seed + i` for every method.

Two measurements (dspark.md §5.4 names throughout):

end to end   each prompt (the file's first P tokens) generates M tokens through the real Engine at
             batch 1, full blocks (fixed scheduler), the run's eos ids as stop tokens. τ = Σ
             emitted / #rounds over all rounds of all files (bonus included; a round ended by an
             accepted eos emits a); its 95% interval is a percentile bootstrap over FILES (files
             resampled with replacement, τ recomputed as the same pooled ratio, seeded). Per slot:
             prefix survival (#rounds accepted > i / #rounds ℓ > i) and conditional acceptance
             (#rounds accepted > i / #rounds accepted > i−1 and ℓ > i). Beside τ: the repeated-4-gram
             share of the generated tokens (Σ (#4-grams − #distinct 4-grams) / Σ #4-grams, counted
             within each request), since a degenerate loop inflates τ; and tokens/s ÷ the `ar`
             tokens/s of the same run and domain (a CPU wall-clock ratio, not a GPU figure).

teacher      the engine's own drafter (`engine.drafter.teacher_forced`, dspark.decode.drafter) proposes
forced       from the TRUE prefix of the file: one dense target forward over the file's first
             `tf_tokens` tokens gives the target's logits and the context features;
             at every anchor p from TF_WARMUP to L−1−γmax (same anchors for every method) the draft
             block is built exactly as in serving (context rows of positions < p, or the draft's
             window), but every token a proposal conditions on after the anchor — the Markov head's
             previous token, MTP's chained input token — is the true one, y_{p+i} for slot i.
             With q_i that slot's draft distribution and p_i the target's at position p+i (softmax at
             temperature T, the one-hot argmax at T = 0: `ops.probs` with top-k / top-p off),

                 α_i(p) = Σ_x min(p_i(x), q_i(x))

             is exactly the probability that slot i is accepted given that slots < i were accepted
             with drafts equal to the true tokens y_{p+1..p+i} (for slot 0 that is no condition;
             later slots condition on the file instead of on what the draft happened to sample).
             P(accepted > i) = Π_{j≤i} α_j(p) and the expected accepted length Σ_i Π_{j≤i} α_j(p)
             are exact for the chain whose accepted drafts are replaced by the true tokens (tests
             check both against a Monte-Carlo of the real rejection sampler). At T = 0, α_i(p) is the
             indicator that the draft's argmax equals the target's argmax along the true file. Reported: τ_tf = 1 +
             mean over anchors of the expected accepted length (DeepSpec's tau_probabilistic, on
             held-out text), with a bootstrap interval over files; survival S_i = mean_p Π_{j≤i} α_j
             and conditional acceptance S_i / S_{i−1}. It measures the drafter on human text,
             independently of what the target itself would generate.

Outputs in `out_dir` (dspark.eval.report): eval.json (everything), table.md, tau.png, acceptance.png,
traces.jsonl (one line per end-to-end round: method, temperature, domain, request, file, round,
proposal_len, accepted, emitted, and confidence_logits when the drafter has a confidence head).
"""


from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from functools import reduce
from pathlib import Path

import torch

from dspark.config import EngineConfig, SamplingParams
from dspark.data.corpus import DOMAINS
from dspark.decode import Engine, collect
from dspark.decode.drafter import target_view
from dspark.decode.methods import get as get_method
from dspark.decode.stats import RequestStats
from dspark.eval.report import write_outputs
from dspark.eval.run import METHODS, Run, heldout_files, load_run, registry_method
from dspark.eval.stats import (TF_WARMUP, acceptance_tf, bootstrap_ci, conditional, ratio, reaching, repeated_ngrams,
                               survival, target_rows, tf_anchors)

_ANCHOR_CHUNK = 32  # teacher-forced anchors per draft call: bounds the [R, S, ...] context copies


@dataclass(frozen=True)
class EvalConfig:
    # data
    files: int = 16  # held-out files (= prompts) per domain, at most
    prompt_tokens: int = 128  # P: the prompt is the file's first P tokens
    max_tokens: int = 128  # M: tokens generated per prompt
    tf_tokens: int = 512  # teacher-forced span: the file's first tf_tokens tokens
    # what runs
    methods: tuple[str, ...] = METHODS
    temperatures: tuple[float, ...] = (0.0, 1.0)
    # randomness: sampling seeds (seed + file index) and the bootstrap
    seed: int = 0
    resamples: int = 1000

    def __post_init__(self):
        bad = [m for m in self.methods if m not in METHODS]
        if bad or not self.methods:
            raise ValueError(f"unknown methods {bad}; expected some of {', '.join(METHODS)}")
        if len(set(self.methods)) != len(self.methods):
            raise ValueError(f"methods repeat: {list(self.methods)}")
        if not self.temperatures or any(t < 0 for t in self.temperatures):
            raise ValueError(f"temperatures must be >= 0, got {list(self.temperatures)}")
        for name in ("files", "prompt_tokens", "max_tokens", "tf_tokens", "resamples"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


def make_engine(run: Run, method: str, max_seq_len: int) -> Engine:
    """Batch-1 Engine for eval method `method` with full blocks and every round's proposals recorded."""
    base = registry_method(method)
    fixed_gamma = base != "ar" and not get_method(base).needs_draft  # a trained draft drafts its block
    config = EngineConfig(max_batch=1, max_seq_len=max_seq_len, record_proposals=True, scheduler="fixed",
                          num_draft_tokens=run.gamma(method) if fixed_gamma else None)
    return Engine(run.target, base, draft=run.drafts.get(method), config=config)


def generate_one(engine: Engine, prompt: list[int], params: SamplingParams) -> tuple[list[int], RequestStats, float]:
    """One request alone in the engine → (generated ids, stats, wall seconds incl. prefill)."""
    start = time.perf_counter()
    (result,) = collect(engine, [prompt], [params])
    return result.token_ids, result.stats, time.perf_counter() - start


def _progress_bar(total: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="eval", unit="job", disable=not enabled, dynamic_ncols=True)


def _end_to_end(run: Run, engines: dict[str, Engine], config: EvalConfig, files: dict, bar) -> dict:
    """(method, T, domain) → per file (generated ids, stats, seconds)."""
    first = files[DOMAINS[0]][0][1][:config.prompt_tokens].tolist()
    for engine in engines.values():
        generate_one(engine, first, SamplingParams(max_tokens=min(4, config.max_tokens)))  # warm-up, not timed
    eos = tuple(run.target.config.eos_token_ids)
    out = {(m, t, d): [] for m in config.methods for t in config.temperatures for d in DOMAINS}
    for t in config.temperatures:
        for d in DOMAINS:
            for i, (_, ids) in enumerate(files[d]):
                bar.set_postfix_str(f"end to end, T = {t:g}, {d} file {i + 1}/{len(files[d])}")
                params = SamplingParams(temperature=t, seed=config.seed + i, stop_token_ids=eos,
                                        max_tokens=config.max_tokens)
                # Methods take turns on each prompt, so a drift in machine load hits them alike.
                for m, engine in engines.items():
                    out[m, t, d].append(generate_one(engine, ids[:config.prompt_tokens].tolist(), params))
                    bar.update(1)
    return out


def _teacher_forced(run: Run, engines: dict[str, Engine], config: EvalConfig, files: dict, tf_len: int,
                    max_gamma: int, bar) -> dict:
    """(method, T, domain) → per file (Σ_p (1 + expected accepted length), #anchors, Σ_p survival [γ])."""
    taps = [t for engine in engines.values() for t in engine.drafter.tap_layers]
    out = {(m, t, d): [] for m in config.methods for t in config.temperatures for d in DOMAINS}
    for d in DOMAINS:
        for i, (_, ids) in enumerate(files[d]):
            bar.set_postfix_str(f"teacher forced, {d} file {i + 1}/{len(files[d])}")
            view = target_view(run.target, ids[:tf_len], taps)
            anchors = tf_anchors(len(view.ids), max_gamma)
            for m in config.methods:
                g = run.gamma(m)
                surv = {t: torch.zeros(g, dtype=torch.float64) for t in config.temperatures}
                propose = engines[m].drafter.teacher_forced(view) if g else None  # per-file work runs here
                for chunk in anchors.split(_ANCHOR_CHUNK) if g else ():
                    drafted, rows = propose(chunk), target_rows(view, chunk, g)
                    for t in config.temperatures:
                        surv[t] += survival(acceptance_tf(rows, drafted, t)).double().sum(0)
                for t in config.temperatures:
                    out[m, t, d].append((len(anchors) + float(surv[t].sum()), len(anchors), surv[t]))
            bar.update(1)
    return out


def evaluate(run_dir: str | Path, out_dir: str | Path, config: EvalConfig = EvalConfig(), *,
             progress: bool = True) -> dict:
    """Run both measurements for every method × temperature × domain; write the outputs to
    `out_dir` and return the eval.json content (see the module docstring for every definition)."""
    run = load_run(run_dir, config.methods)
    gammas = {m: run.gamma(m) for m in config.methods}
    max_gamma = max(max(gammas.values()), run.k)
    max_pos = run.target.config.max_position_embeddings
    max_seq_len = config.prompt_tokens + config.max_tokens + max_gamma + 1
    if max_seq_len > max_pos:
        raise ValueError(f"--prompt-tokens {config.prompt_tokens} + --max-tokens {config.max_tokens} + a block of "
                         f"{max_gamma} exceed the target's {max_pos} positions")
    tf_len = min(config.tf_tokens, max_pos)
    if tf_len < TF_WARMUP + max_gamma + 1:
        raise ValueError(f"--tf-tokens {config.tf_tokens} leaves no anchor: the teacher-forced span needs the "
                         f"{TF_WARMUP}-token warm-up plus a block of {max_gamma} and its next token")
    files = {d: heldout_files(run, d, config.files, max(config.prompt_tokens + 1, TF_WARMUP + max_gamma + 1))
             for d in DOMAINS}
    count = sum(len(f) for f in files.values())
    bar = _progress_bar(count * (len(config.methods) * len(config.temperatures) + 1), progress)
    engines = {m: make_engine(run, m, max_seq_len) for m in config.methods}
    e2e = _end_to_end(run, engines, config, files, bar)
    tf = _teacher_forced(run, engines, config, files, tf_len, max_gamma, bar)
    bar.close()

    results = {
        "config": dataclasses.asdict(config), "run": str(run.path), "k": run.k,
        "files": {d: [rel for rel, _ in files[d]] for d in DOMAINS},
        "cpu_threads": torch.get_num_threads(),
        "definitions": {
            "tau": "mean tokens emitted per decode round, bonus included (dspark.md §5.4)",
            "tau_ci": f"95% percentile bootstrap over files, {config.resamples} resamples, seed {config.seed}",
            "prefix_survival": "#rounds accepted > i / #rounds proposal_len > i (DeepSpec accept_rate@i)",
            "conditional_acceptance": "#rounds accepted > i / #rounds accepted > i-1 and proposal_len > i",
            "repeated_4gram_share": "sum(#4-grams - #distinct 4-grams) / sum(#4-grams) of the generated tokens, "
                                    "counted within each request",
            "speed_vs_ar": "tokens/s / tokens/s of ar, same run, temperature and domain; CPU wall clock, batch 1",
            "teacher_forced": "alpha_i = sum_x min(p_i, q_i) from the true prefix, Markov / MTP inputs "
                              "teacher-forced; tau = 1 + mean over anchors of sum_i prod_{j<=i} alpha_j; "
                              "conditional acceptance = S_i / S_(i-1) with S_i the mean of prod_{j<=i} alpha_j",
        },
        "rows": [_summarise(key, gammas[key[0]], e2e[key], tf[key], e2e.get(("ar", key[1], key[2])), config)
                 for key in e2e],
    }
    write_outputs(results, e2e, files, out_dir)
    return results


def _summarise(key, gamma: int, runs, tf_files, ar_runs, config: EvalConfig) -> dict:
    method, temperature, domain = key
    stats = [s for _, s, _ in runs]
    merged = reduce(RequestStats.merge, stats, RequestStats())
    reached = reaching(merged)
    num, den = [sum(s.emitted) for s in stats], [s.rounds for s in stats]
    rep = [repeated_ngrams(tokens) for tokens, _, _ in runs]
    tokens = sum(len(t) for t, _, _ in runs)
    seconds = sum(sec for _, _, sec in runs)
    speed = tokens / seconds if seconds else float("nan")
    ar_speed = None
    if ar_runs:
        ar_speed = sum(len(t) for t, _, _ in ar_runs) / sum(sec for _, _, sec in ar_runs)
    tf_num, tf_den = [f[0] for f in tf_files], [f[1] for f in tf_files]
    surv = (sum((f[2] for f in tf_files), torch.zeros(gamma, dtype=torch.float64)) / max(sum(tf_den), 1)).tolist()
    return {
        "method": method, "temperature": temperature, "domain": domain, "num_draft_tokens": gamma,
        "end_to_end": {
            "tau": ratio(num, den), "tau_ci": bootstrap_ci(num, den, seed=config.seed, resamples=config.resamples),
            "requests": len(stats), "rounds": sum(den), "tokens": tokens,
            "prefix_survival": merged.prefix_survival(),
            # None where no round reached the slot (RequestStats reports 0 there, which reads as a measurement).
            "conditional_acceptance": [c if n else None for c, n in zip(merged.conditional_acceptance(), reached)],
            "rounds_reaching_slot": reached,
            "repeated_4gram_share": ratio([r for r, _ in rep], [n for _, n in rep]),
            "tokens_per_s_cpu": speed, "speed_vs_ar": speed / ar_speed if ar_speed else None, "seconds": seconds,
        },
        "teacher_forced": {
            "tau": ratio(tf_num, tf_den),  # ar: no drafts, every anchor counts 1
            "tau_ci": bootstrap_ci(tf_num, tf_den, seed=config.seed, resamples=config.resamples),
            "anchors": sum(tf_den), "prefix_survival": surv, "conditional_acceptance": conditional(surv),
        },
    }
