"""What `dspark eval` writes: eval.json (NaN as null), table.md, tau.png, acceptance.png and
traces.jsonl (one line per end-to-end round, what a serving simulator replays)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from dspark.data.corpus import DOMAINS
from dspark.decode.stats import RequestStats


def write_outputs(results: dict, end_to_end: dict, files: dict, out_dir: str | Path) -> None:
    """Every output file of one evaluation into `out_dir`. end_to_end: (method, T, domain) → per file
    (generated ids, stats, seconds); files: domain → [(relpath, ids)]."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval.json").write_text(json.dumps(json_safe(results), indent=1) + "\n")
    (out / "table.md").write_text(markdown_table(results) + "\n")
    with open(out / "traces.jsonl", "w") as fh:
        for (method, t, domain), per_file in end_to_end.items():
            for i, (_, stats, _) in enumerate(per_file):
                for line in trace_lines(stats):
                    fh.write(json.dumps({"method": method, "temperature": t, "domain": domain, "request": i,
                                         "file": files[domain][i][0], **line}) + "\n")
    plot(results, out)


def json_safe(obj):
    """NaN (no rounds to average) as null: strict JSON readers refuse NaN."""
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return None if isinstance(obj, float) and obj != obj else obj


def trace_lines(stats: RequestStats) -> list[dict]:
    """One dict per decode round for a serving simulator."""
    conf = stats.confidence_logits or [None] * stats.rounds
    return [{"round": r, "proposal_len": ell, "accepted": a, "emitted": e,
             **({"confidence_logits": c} if c is not None else {})}
            for r, (ell, a, e, c) in enumerate(zip(stats.proposal_lens, stats.accepted, stats.emitted, conf))]


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
