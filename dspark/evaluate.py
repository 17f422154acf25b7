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

teacher      the drafter proposes from the TRUE prefix of the file: one dense target forward over
forced       the file's first `tf_tokens` tokens gives the target's logits and the context features;
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
             check both against a Monte-Carlo of the real rejection sampler). At T = 0, α_i(p) is the indicator that the
             draft's argmax equals the target's argmax along the true file. Reported: τ_tf = 1 +
             mean over anchors of the expected accepted length (DeepSpec's tau_probabilistic, on
             held-out text), with a bootstrap interval over files; survival S_i = mean_p Π_{j≤i} α_j
             and conditional acceptance S_i / S_{i−1}. It measures the drafter on human text,
             independently of what the target itself would generate.

Outputs in `out_dir`: eval.json (everything), table.md, tau.png, acceptance.png, traces.jsonl (one
line per end-to-end round: method, temperature, domain, request, file, round, proposal_len,
accepted, emitted, and confidence_logits when the drafter has a confidence head).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from dataclasses import dataclass
from functools import reduce
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from dspark import checkpoint, ops
from dspark.config import EngineConfig, SamplingParams
from dspark.decode import Engine, collect
from dspark.decode.buffers import SlotState
from dspark.decode.ngram import NgramDrafter
from dspark.decode.stats import RequestStats
from dspark.data.corpus import DOMAINS, tokenize_corpus

METHODS = ("ar", "ngram", "mtp-1", "mtp-k", "dflash", "dflash-l1", "dspark", "dspark-v4")
DRAFT_METHODS = ("dflash", "dflash-l1", "dspark", "dspark-v4")
# Teacher-forced anchors start here: no served prompt is a handful of tokens long, yet each such
# near-empty-context anchor would weigh as much as any other.
TF_WARMUP = 16
_ANCHOR_CHUNK = 32  # teacher-forced anchors per draft call: bounds the [R, S, ...] context copies
_NGRAM = 4  # n of the repetition measure


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


# ------------------------------------------------------------------------------------- the run
@dataclass
class Run:
    """A nano run directory's models: the target, the drafts the methods need, k."""

    path: Path
    target: object  # DeepseekV4
    drafts: dict[str, object]  # method → DraftModel / V4DSparkDraft
    k: int  # the DSpark block size: γ of mtp-k and ngram

    def gamma(self, method: str) -> int:
        if method == "ar":
            return 0
        if method == "mtp-1":
            return 1
        if method in ("mtp-k", "ngram"):
            return self.k
        return self.drafts[method].block_size


def _missing_stages(run: Path, methods: tuple[str, ...]) -> list[str]:
    """The run's stages that `methods` need and that are absent, as 'what (path)'."""
    need = [("corpus stage", "corpus/manifest.json"), ("tokenizer stage", "tokenizer/tokenizer.json"),
            ("target stage", "target/final/config.json")]
    need += [(f"{m} draft", f"drafts/{m}/draft/config.json") for m in methods if m in DRAFT_METHODS]
    return [f"{what} ({rel})" for what, rel in need if not (run / rel).exists()]


def load_run(run_dir: str | Path, methods: tuple[str, ...] = METHODS) -> Run:
    """Load what `methods` need from a nano run directory; missing stages are named in the error."""
    run = Path(run_dir)
    if not run.is_dir():
        raise ValueError(f"no run directory at {run}")
    missing = _missing_stages(run, methods)
    if missing:
        raise ValueError(f"{run} lacks the {', the '.join(missing)}; finish the run with "
                         f"`dspark train-nano --out {run}` (add --smoke for a smoke run)")
    target = checkpoint.load_target(run / "target" / "final").eval()
    if any(m.startswith("mtp") for m in methods) and not target.has_mtp:
        raise ValueError(f"{run}/target/final has no MTP module (its checkpoint carries none under mtp.*)")
    drafts = {}
    for method in methods:
        if method in DRAFT_METHODS:
            where = run / "drafts" / method / "draft"
            draft = checkpoint.load_draft(where, target)
            drafts[method] = draft.eval()
    dspark_dir = run / "drafts" / "dspark" / "draft"
    if (dspark_dir / "config.json").exists():
        k = checkpoint.read_draft_config(dspark_dir).block_size
    elif target.config.dspark is not None:
        k = target.config.dspark.block_size
    else:
        raise ValueError(f"{run} names no DSpark block size (no drafts/dspark draft, no dspark_* target fields)")
    return Run(run, target, drafts, k)


def _file_key(relpath: str) -> str:
    return hashlib.sha256(f"eval:{relpath}".encode("utf-8")).hexdigest()


def heldout_files(run: Run, domain: str, count: int, min_tokens: int) -> list[tuple[str, torch.Tensor]]:
    """Up to `count` held-out documents of `domain` with at least `min_tokens` tokens (eos included),
    as (relpath, int64 ids), chosen in sha256 order of their relpaths (deterministic, unbiased by name)."""
    docs = tokenize_corpus(run.path / "corpus", run.path / "tokenizer", "heldout", domain)
    docs = sorted(docs, key=lambda d: _file_key(d[0]))
    picked = [(rel, ids.long()) for rel, ids in docs if len(ids) >= min_tokens][:count]
    if not picked:
        raise ValueError(f"{run.path}: no held-out {domain} document has {min_tokens} tokens "
                         f"({len(docs)} held-out {domain} documents); lower --prompt-tokens")
    return picked


# ------------------------------------------------------------------------------- end to end
def make_engine(run: Run, method: str, max_seq_len: int) -> Engine:
    """Batch-1 Engine for `method` with full blocks and every round's proposals recorded."""
    base = "mtp" if method.startswith("mtp") else method
    config = EngineConfig(max_batch=1, max_seq_len=max_seq_len, record_proposals=True, scheduler="fixed",
                          num_draft_tokens=run.gamma(method) if base in ("mtp", "ngram") else None)
    return Engine(run.target, base, draft=run.drafts.get(method), config=config)


def generate_one(engine: Engine, prompt: list[int], params: SamplingParams) -> tuple[list[int], RequestStats, float]:
    """One request alone in the engine → (generated ids, stats, wall seconds incl. prefill)."""
    start = time.perf_counter()
    (result,) = collect(engine, [prompt], [params])
    return result.token_ids, result.stats, time.perf_counter() - start


def repeated_ngrams(tokens: list[int], n: int = _NGRAM) -> tuple[int, int]:
    """(#n-grams − #distinct n-grams, #n-grams) of one token sequence."""
    grams = [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]
    return len(grams) - len(set(grams)), len(grams)


# --------------------------------------------------------------------------- teacher forcing
@dataclass
class TargetView:
    """One dense target forward over a file's tokens (no cache)."""

    ids: torch.Tensor  # [L] int64
    logits: torch.Tensor  # [L, V] fp32: row t is the target's distribution for token t+1
    streams: torch.Tensor  # [L, N, D] last-layer streams (the MTP's input)
    taps: dict[int, torch.Tensor]  # layer → stream mean [L, D]


@torch.no_grad()
def target_view(target, ids: torch.Tensor, tap_layers) -> TargetView:
    out = target.run(ids.unsqueeze(0), tap_layers=tuple(sorted(set(tap_layers))))
    return TargetView(ids, out.logits[0], out.streams[0], {layer: t[0] for layer, t in out.taps.items()})


def tf_anchors(length: int, max_gamma: int) -> torch.Tensor:
    """Anchors TF_WARMUP .. L−1−γmax: every slot's true next token lies inside the span."""
    return torch.arange(TF_WARMUP, max(TF_WARMUP, length - max_gamma))


def target_rows(view: TargetView, anchors: torch.Tensor, gamma: int) -> torch.Tensor:
    """The target's logits for slot i of the block at p: row p+i → [A, γ, V]."""
    return view.logits[anchors.unsqueeze(-1) + torch.arange(gamma)]


def _block_drafter_tf(draft, view: TargetView) -> Callable[[torch.Tensor], torch.Tensor]:
    """A DSpark / DFlash draft (either layout) on one file, Markov head teacher-forced."""
    ids, gamma = view.ids, draft.block_size
    features = torch.cat([view.taps[layer] for layer in draft.tap_layers], dim=-1)  # [L, F]
    positions = torch.arange(len(ids))
    with torch.no_grad():
        rows = draft.context_rows(draft.project_context(features), positions)  # per layer, [L, ...] each
    window = draft.context_window or len(ids)

    @torch.no_grad()
    def propose(anchors: torch.Tensor) -> torch.Tensor:
        span = int(anchors.max())  # context rows any anchor reads: positions < p
        r = len(anchors)
        context = [tuple(t[:span].unsqueeze(0).expand(r, span, *t.shape[1:]) for t in layer) for layer in rows]
        p = anchors.unsqueeze(-1)
        valid = (positions[:span] < p) & (positions[:span] >= p - window)  # [A, span], as the engine's ring
        block_pos = p + torch.arange(gamma)  # [A, γ]
        block_ids = torch.full_like(block_pos, draft.block_input_token)
        block_ids[:, 0] = ids[anchors]
        h = draft.block_hidden(block_ids, block_pos, context, valid)
        h = h[1] if isinstance(h, tuple) else h  # the V4 layout returns (h_pre, h)
        return draft.corrected_logits_tf(draft.base_logits(h), ids[block_pos], h)  # prev_i = y_{p+i}

    return propose


def _mtp_drafter_tf(target, view: TargetView, k: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """The target's MTP chained k times on one file, fed the TRUE token at every step.

    Draft 1 comes from the pair (H_{p−1}, y_p) of a dense MTP pass over the file's true pairs;
    draft j+1 from (Y_j, y_{p+j}) at position p+j−1, attending over the window as the engine's MTP
    ring holds it: true rows at positions < p, this anchor's chain rows from p on.
    """
    block, ids = target.mtp[0], view.ids
    embed, head = target.model.embed_tokens, target.lm_head.weight.float()
    window = block.self_attn.window
    true_keys = []

    def capture(attn, x):  # the dense pass, keeping the K=V row of every true pair
        pos = torch.arange(x.shape[1]).expand(1, -1)
        true_keys.append(attn.project_kv(x, *attn.rotary(pos))[0])  # [L−1, hd]
        return attn(x)

    with torch.no_grad():
        nxt = ids[1:].unsqueeze(0)
        true_out = block.streams(view.streams[:-1].unsqueeze(0), embed(nxt), nxt, capture)[0]  # [L−1, N, D]
    keys_true = true_keys[0]

    @torch.no_grad()
    def propose(anchors: torch.Tensor) -> torch.Tensor:
        y = true_out[anchors - 1]  # [A, N, D]
        logits, chain = [F.linear(block.hidden(y).float(), head)], []
        for j in range(1, k):
            pos = anchors + j - 1

            def attend(attn, x, pos=pos, j=j):  # x [A, D]: one row per anchor at position p+j−1
                cos, sin = attn.rotary(pos)
                q, _ = attn.project_q(x, cos, sin)  # [A, H, hd]
                chain.append(attn.project_kv(x, cos, sin))  # [A, hd]
                win = pos.unsqueeze(-1) - (window - 1) + torch.arange(window)  # [A, W]
                mine = torch.stack(chain, 1)  # [A, j, hd]: chain rows at positions p .. p+j−1
                off = (win - anchors.unsqueeze(-1)).clamp(0, j - 1)
                keys = torch.where((win >= anchors.unsqueeze(-1)).unsqueeze(-1),
                                   mine.gather(1, off.unsqueeze(-1).expand(-1, -1, mine.shape[-1])),
                                   keys_true[win.clamp(0, len(keys_true) - 1)])
                allowed = win >= 0
                keys = torch.where(allowed.unsqueeze(-1), keys, 0.0)
                o = ops.sink_attention(q.unsqueeze(1), keys, allowed.unsqueeze(1), attn.sinks, attn.scale,
                                       kernels=attn.kernels)[:, 0]
                return attn.project_out(o, cos, sin)

            tok = ids[anchors + j]
            y = block.streams(y, embed(tok), tok, attend)
            logits.append(F.linear(block.hidden(y).float(), head))
        return torch.stack(logits, 1)

    return propose


def _ngram_drafter_tf(vocab_size: int, view: TargetView, gamma: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """Prompt lookup over the true prefix y_0..y_p, one history row per anchor (one-hot logits)."""
    length = len(view.ids)

    def propose(anchors: torch.Tensor) -> torch.Tensor:
        r = len(anchors)
        drafter = NgramDrafter(vocab_size, gamma, r, length)
        # Rows hold the whole file; the drafter reads only positions < length[r] = p + 1.
        drafter.history[:r, :length] = view.ids
        drafter.length[:r] = anchors + 1
        slots = SlotState.allocate(r, 1, view.ids.device)
        slots.anchor = view.ids[anchors]
        return drafter.propose(slots, torch.zeros(r, gamma)).logits

    return propose


def teacher_forced_drafter(run: Run, method: str, view: TargetView) -> Callable[[torch.Tensor], torch.Tensor]:
    """`method`'s drafter on one file, teacher-forced: anchors [A] (each ≥ 1, ≤ L−1−γ) → the logits
    of its draft distributions [A, γ, V]. Per-file work (context rows, the MTP's dense pass) runs here once."""
    if method in DRAFT_METHODS:
        return _block_drafter_tf(run.drafts[method], view)
    if method.startswith("mtp"):
        return _mtp_drafter_tf(run.target, view, run.gamma(method))
    if method == "ngram":
        return _ngram_drafter_tf(run.target.config.vocab_size, view, run.k)
    raise ValueError(f"method {method!r} drafts nothing")


def _distribution(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """softmax(logits / T), or the one-hot argmax (lowest index on ties) at T = 0: what `ops.probs`
    gives with top-k / top-p off. NOTE: not `ops.probs` itself: its bit-exact CPU reference costs
    ~0.3 µs per element, minutes per file at V = 8k, and agrees with this to ~1e-7."""
    if temperature == 0:
        return F.one_hot(logits.argmax(-1), logits.shape[-1]).float()
    return (logits.float() / temperature).softmax(-1)


def acceptance_tf(target_logits: torch.Tensor, draft_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Exact per-slot acceptance α_i = Σ_x min(p_i(x), q_i(x)) at `temperature` (0: argmax match).

    target_logits, draft_logits [A, γ, V] → [A, γ] fp32.
    """
    return torch.minimum(_distribution(target_logits, temperature), _distribution(draft_logits, temperature)).sum(-1)


def survival(alpha: torch.Tensor) -> torch.Tensor:
    """P(accepted > i) of the teacher-forced chain: Π_{j≤i} α_j → [A, γ]."""
    return alpha.cumprod(-1)


# --------------------------------------------------------------------------------- statistics
def bootstrap_ci(num, den, *, seed: int, resamples: int = 1000, level: float = 0.95) -> tuple[float, float]:
    """Percentile interval of Σ num / Σ den with whole files resampled (num, den [F]); NaN without data."""
    num, den = torch.as_tensor(num, dtype=torch.float64), torch.as_tensor(den, dtype=torch.float64)
    if len(num) == 0:
        return float("nan"), float("nan")
    pick = torch.randint(len(num), (resamples, len(num)), generator=torch.Generator().manual_seed(seed))
    d = den[pick].sum(1)
    ratios = (num[pick].sum(1) / d)[d > 0]  # a resample of files without rounds has no τ
    if len(ratios) == 0:
        return float("nan"), float("nan")
    lo, hi = torch.quantile(ratios, torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64))
    return float(lo), float(hi)


def _ratio(num, den) -> float:
    return float(sum(num) / sum(den)) if sum(den) else float("nan")


def _conditional(surv: list[float]) -> list[float | None]:
    """Conditional acceptance S_i / S_{i−1} from survival (S_{−1} = 1); None where no anchor survives."""
    return [s / prev if prev > 0 else None for s, prev in zip(surv, [1.0] + surv[:-1])]


def _reaching(stats: RequestStats) -> list[int]:
    """Rounds that reach slot i (accepted > i−1 and ℓ > i): the conditional acceptance's denominators."""
    return [sum(1 for ell, a in zip(stats.proposal_lens, stats.accepted) if ell > i and a >= i)
            for i in range(max(stats.proposal_lens, default=0))]


# --------------------------------------------------------------------------------- the driver
def _progress_bar(total: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="eval", unit="job", disable=not enabled, dynamic_ncols=True)


def _end_to_end(run: Run, config: EvalConfig, files: dict, max_seq_len: int, bar) -> dict:
    """(method, T, domain) → per file (generated ids, stats, seconds)."""
    engines = {m: make_engine(run, m, max_seq_len) for m in config.methods}
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


def _teacher_forced(run: Run, config: EvalConfig, files: dict, tf_len: int, max_gamma: int, bar) -> dict:
    """(method, T, domain) → per file (Σ_p (1 + expected accepted length), #anchors, Σ_p survival [γ])."""
    taps = [t for m in config.methods if m in DRAFT_METHODS for t in run.drafts[m].tap_layers]
    out = {(m, t, d): [] for m in config.methods for t in config.temperatures for d in DOMAINS}
    for d in DOMAINS:
        for i, (_, ids) in enumerate(files[d]):
            bar.set_postfix_str(f"teacher forced, {d} file {i + 1}/{len(files[d])}")
            view = target_view(run.target, ids[:tf_len], taps)
            anchors = tf_anchors(len(view.ids), max_gamma)
            for m in config.methods:
                g = run.gamma(m)
                surv = {t: torch.zeros(g, dtype=torch.float64) for t in config.temperatures}
                propose = teacher_forced_drafter(run, m, view) if g else None
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
    e2e = _end_to_end(run, config, files, max_seq_len, bar)
    tf = _teacher_forced(run, config, files, tf_len, max_gamma, bar)
    bar.close()

    keys = list(e2e)
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
                 for key in keys],
    }
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval.json").write_text(json.dumps(_json_safe(results), indent=1) + "\n")
    (out / "table.md").write_text(markdown_table(results) + "\n")
    with open(out / "traces.jsonl", "w") as fh:
        for (method, t, domain), per_file in e2e.items():
            for i, (_, stats, _) in enumerate(per_file):
                for line in trace_lines(stats):
                    fh.write(json.dumps({"method": method, "temperature": t, "domain": domain, "request": i,
                                         "file": files[domain][i][0], **line}) + "\n")
    plot(results, out)
    return results


def _json_safe(obj):
    """NaN (no rounds to average) as null: strict JSON readers refuse NaN."""
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return None if isinstance(obj, float) and obj != obj else obj


def trace_lines(stats: RequestStats) -> list[dict]:
    """One dict per decode round for a serving simulator."""
    conf = stats.confidence_logits or [None] * stats.rounds
    return [{"round": r, "proposal_len": ell, "accepted": a, "emitted": e,
             **({"confidence_logits": c} if c is not None else {})}
            for r, (ell, a, e, c) in enumerate(zip(stats.proposal_lens, stats.accepted, stats.emitted, conf))]


def _summarise(key, gamma: int, runs, tf_files, ar_runs, config: EvalConfig) -> dict:
    method, temperature, domain = key
    stats = [s for _, s, _ in runs]
    merged = reduce(RequestStats.merge, stats, RequestStats())
    reaching = _reaching(merged)
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
            "tau": _ratio(num, den), "tau_ci": bootstrap_ci(num, den, seed=config.seed, resamples=config.resamples),
            "requests": len(stats), "rounds": sum(den), "tokens": tokens,
            "prefix_survival": merged.prefix_survival(),
            # None where no round reached the slot (RequestStats reports 0 there, which reads as a measurement).
            "conditional_acceptance": [c if n else None for c, n in zip(merged.conditional_acceptance(), reaching)],
            "rounds_reaching_slot": reaching,
            "repeated_4gram_share": _ratio([r for r, _ in rep], [n for _, n in rep]),
            "tokens_per_s_cpu": speed, "speed_vs_ar": speed / ar_speed if ar_speed else None, "seconds": seconds,
        },
        "teacher_forced": {
            "tau": _ratio(tf_num, tf_den),  # ar: no drafts, every anchor counts 1
            "tau_ci": bootstrap_ci(tf_num, tf_den, seed=config.seed, resamples=config.resamples),
            "anchors": sum(tf_den), "prefix_survival": surv, "conditional_acceptance": _conditional(surv),
        },
    }


# ------------------------------------------------------------------------------------ outputs
def markdown_table(results: dict) -> str:
    """The README table: one row per method × temperature × domain."""
    lines = ["| method | γ | T | domain | τ end to end [95% CI] | repeated 4-grams | τ teacher-forced [95% CI] "
             "| speed ÷ ar (CPU) |", "|---|---|---|---|---|---|---|---|"]
    for row in results["rows"]:
        e, t = row["end_to_end"], row["teacher_forced"]
        speed = "—" if e["speed_vs_ar"] is None else f"{e['speed_vs_ar']:.2f}×"
        lines.append(f"| {row['method']} | {row['num_draft_tokens']} | {row['temperature']:g} | {row['domain']} "
                     f"| {e['tau']:.2f} [{e['tau_ci'][0]:.2f}, {e['tau_ci'][1]:.2f}] "
                     f"| {e['repeated_4gram_share']:.1%} "
                     f"| {t['tau']:.2f} [{t['tau_ci'][0]:.2f}, {t['tau_ci'][1]:.2f}] | {speed} |")
    cfg = results["config"]
    lines.append(f"\nτ counts the bonus token; intervals bootstrap over {sum(map(len, results['files'].values()))} "
                 f"held-out files; prompts of {cfg['prompt_tokens']} tokens, {cfg['max_tokens']} generated, batch 1, "
                 f"full blocks; teacher-forced over each file's first {cfg['tf_tokens']} tokens; speed is a CPU "
                 f"wall-clock ratio on {results['cpu_threads']} thread(s).")
    return "\n".join(lines)


def plot(results: dict, out_dir: str | Path) -> None:
    """tau.png (τ per method with CI bars, both measurements) and acceptance.png (conditional
    acceptance per slot), one panel per temperature × domain."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    rows = results["rows"]
    temps = list(dict.fromkeys(r["temperature"] for r in rows))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    colors = {m: plt.cm.tab10(i % 10) for i, m in enumerate(methods)}

    def row(m, t, d):
        return next(r for r in rows if (r["method"], r["temperature"], r["domain"]) == (m, t, d))

    fig, axes = plt.subplots(len(temps), len(DOMAINS), figsize=(5.5 * len(DOMAINS), 3.4 * len(temps)), squeeze=False)
    x = torch.arange(len(methods)).float()
    for ti, t in enumerate(temps):
        for di, d in enumerate(DOMAINS):
            ax = axes[ti][di]
            for offset, part, label in ((-0.2, "end_to_end", "end to end"), (0.2, "teacher_forced", "teacher-forced")):
                taus = [row(m, t, d)[part]["tau"] for m in methods]
                cis = [row(m, t, d)[part]["tau_ci"] for m in methods]
                err = [[tau - lo for tau, (lo, _) in zip(taus, cis)], [hi - tau for tau, (_, hi) in zip(taus, cis)]]
                ax.bar((x + offset).tolist(), taus, 0.4, yerr=err, capsize=2, label=label,
                       alpha=1.0 if part == "end_to_end" else 0.55)
            ax.set_xticks(x.tolist(), methods, rotation=35, ha="right", fontsize=8)
            ax.set_title(f"T = {t:g}, {d}", fontsize=9)
            ax.set_ylabel("τ (tokens / round)")
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "tau.png", dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(len(temps), 2 * len(DOMAINS), figsize=(4.2 * 2 * len(DOMAINS), 3.2 * len(temps)),
                             squeeze=False)
    for ti, t in enumerate(temps):
        for di, d in enumerate(DOMAINS):
            for pi, (part, label) in enumerate((("end_to_end", "end to end"), ("teacher_forced", "teacher-forced"))):
                ax = axes[ti][2 * di + pi]
                for m in methods:
                    curve = [float("nan") if c is None else c for c in row(m, t, d)[part]["conditional_acceptance"]]
                    if curve:
                        ax.plot(range(len(curve)), curve, marker="o", ms=3, color=colors[m], label=m)
                ax.set_ylim(0, 1.02)
                ax.set_xlabel("slot i")
                ax.set_ylabel("P(accept i | accepted < i)")
                ax.set_title(f"{label}, T = {t:g}, {d}", fontsize=9)
                ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(out / "acceptance.png", dpi=110)
    plt.close(fig)


__all__ = ["METHODS", "DRAFT_METHODS", "TF_WARMUP", "EvalConfig", "Run", "load_run", "heldout_files", "make_engine",
           "generate_one", "repeated_ngrams", "TargetView", "target_view", "tf_anchors", "target_rows",
           "teacher_forced_drafter", "acceptance_tf", "survival", "bootstrap_ci", "evaluate", "trace_lines",
           "markdown_table", "plot"]
