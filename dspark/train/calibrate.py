"""Sequential Temperature Scaling of the confidence head, and calibration metrics (dspark.md §3).

Layouts: N verified rounds, γ draft slots.

    z         [N, γ] fp32  raw confidence logits of full-block rollouts
    labels    [N, γ]       1 iff slots 0..k were all accepted (prefix survival)
    verified  [N, γ] bool  slot k was verified in that round (only those count for slot k)

Predictions are survival probabilities a_k = Π_{i≤k} σ(z_i / T_i), the quantity the schedulers use.
STS fits T_0, T_1, ... left to right: T_k minimises the ECE of a_k given the already frozen T_<k,
over a log-spaced grid on [0.25, 8] with T = 1 always included (the paper gives no grid). Metrics
follow DeepSpec's recorder: ECE with 20 equal-width bins, AUROC from 1000-bin histograms (ties
count ½), Brier; predictions clamped to [1e-8, 1 − 1e-8].
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

ECE_BINS, AUROC_BINS = 20, 1000


def default_grid() -> torch.Tensor:
    grid = torch.logspace(torch.log10(torch.tensor(0.25)), torch.log10(torch.tensor(8.0)), 200, dtype=torch.float64)
    return torch.cat([grid, torch.ones(1, dtype=torch.float64)]).unique()


def ece(pred: torch.Tensor, label: torch.Tensor, bins: int = ECE_BINS) -> float:
    """Σ_b (n_b / N) · |mean pred_b − mean label_b| over equal-width bins (0 for no samples)."""
    pred, label = pred.double().clamp(1e-8, 1 - 1e-8), label.double()
    if pred.numel() == 0:
        return 0.0
    b = (pred * bins).floor().clamp(0, bins - 1).long()
    p_sum = torch.zeros(bins, dtype=torch.float64).index_add_(0, b, pred)
    y_sum = torch.zeros(bins, dtype=torch.float64).index_add_(0, b, label)
    return float((p_sum - y_sum).abs().sum() / pred.numel())


def auroc(pred: torch.Tensor, label: torch.Tensor, bins: int | None = AUROC_BINS) -> float:
    """P(pred of a random positive > pred of a random negative), ties ½, on `bins` histogram bins
    (DeepSpec's recorder) or exactly from ranks with bins=None; NaN when a class is missing."""
    pred, label = pred.double().clamp(1e-8, 1 - 1e-8), label.bool()
    if label.all() or not label.any():
        return float("nan")
    if bins is None:  # exact: every distinct value is its own bin
        b = torch.unique(pred, return_inverse=True)[1]
        bins = int(b.max()) + 1
    else:
        b = (pred * bins).floor().clamp(0, bins - 1).long()
    pos = torch.bincount(b[label], minlength=bins).double()
    neg = torch.bincount(b[~label], minlength=bins).double()
    neg_below = torch.cumsum(neg, 0) - neg
    return float(((pos * (neg_below + 0.5 * neg)).sum()) / (pos.sum() * neg.sum()))


def brier(pred: torch.Tensor, label: torch.Tensor) -> float:
    if pred.numel() == 0:
        return 0.0
    return float(((pred.double().clamp(1e-8, 1 - 1e-8) - label.double()) ** 2).mean())


def survival(z: torch.Tensor, temperatures: torch.Tensor) -> torch.Tensor:
    """a_k = Π_{i≤k} σ(z_i / T_i) → [N, γ] fp64."""
    return torch.sigmoid(z.double() / temperatures.double()).cumprod(-1)


def _check(z, labels, verified):
    if z.dim() != 2 or labels.shape != z.shape or verified.shape != z.shape:
        raise ValueError(f"z, labels and verified must share one [N, γ] shape, got {tuple(z.shape)}, "
                         f"{tuple(labels.shape)}, {tuple(verified.shape)}")
    if not torch.isfinite(z).all():
        raise ValueError("confidence logits contain NaN or inf")


def fit_sts(z: torch.Tensor, labels: torch.Tensor, verified: torch.Tensor,
            grid: torch.Tensor | None = None) -> torch.Tensor:
    """Per-slot temperatures [γ], fitted left to right (slots never verified keep T = 1)."""
    _check(z, labels, verified)
    grid = default_grid() if grid is None else grid.double()
    if (grid <= 0).any():
        raise ValueError("temperature grid values must be positive")
    temps = torch.ones(z.shape[1], dtype=torch.float64)
    prior = torch.ones(z.shape[0], dtype=torch.float64)
    for k in range(z.shape[1]):
        rows = verified[:, k]
        if rows.any():
            scores = [ece(prior[rows] * torch.sigmoid(z[rows, k].double() / t), labels[rows, k]) for t in grid]
            temps[k] = grid[min(range(len(grid)), key=lambda i: (scores[i], abs(float(grid[i]) - 1)))]
        prior = prior * torch.sigmoid(z[:, k].double() / temps[k])
    return temps


def report(z: torch.Tensor, labels: torch.Tensor, verified: torch.Tensor, temperatures: torch.Tensor) -> list[dict]:
    """Per slot: samples, acceptance rate, and ECE / AUROC / Brier before (T = 1) and after STS."""
    _check(z, labels, verified)
    before = survival(z, torch.ones(z.shape[1]))
    after = survival(z, temperatures)
    rows = []
    for k in range(z.shape[1]):
        m = verified[:, k]
        y = labels[m, k]
        rows.append(dict(slot=k, samples=int(m.sum()), accept=float(y.double().mean()) if m.any() else float("nan"),
                         temperature=float(temperatures[k]),
                         ece_before=ece(before[m, k], y), ece_after=ece(after[m, k], y),
                         auroc_before=auroc(before[m, k], y), auroc_after=auroc(after[m, k], y),
                         brier_before=brier(before[m, k], y), brier_after=brier(after[m, k], y)))
    return rows


def format_table(rows: list[dict]) -> str:
    head = f"{'slot':>4} {'n':>7} {'accept':>7} {'T':>6} {'ECE before':>10} {'after':>7} " \
           f"{'AUROC before':>12} {'after':>7} {'Brier before':>12} {'after':>7}"
    lines = [head]
    for r in rows:
        lines.append(f"{r['slot']:>4} {r['samples']:>7} {r['accept']:>7.3f} {r['temperature']:>6.3f} "
                     f"{100 * r['ece_before']:>9.2f}% {100 * r['ece_after']:>6.2f}% {r['auroc_before']:>12.3f} "
                     f"{r['auroc_after']:>7.3f} {r['brier_before']:>12.4f} {r['brier_after']:>7.4f}")
    return "\n".join(lines)


def reliability_diagram(z: torch.Tensor, labels: torch.Tensor, verified: torch.Tensor, temperatures: torch.Tensor,
                        path: str | Path, bins: int = ECE_BINS) -> Path:
    """A PNG with one panel per slot: mean outcome vs mean predicted survival per bin, before and after."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    gamma = z.shape[1]
    fig, axes = plt.subplots(1, gamma, figsize=(2.6 * gamma, 2.8), squeeze=False)
    for k, ax in enumerate(axes[0]):
        m = verified[:, k]
        for temps, style, name in ((torch.ones(gamma), "o--", "raw"), (temperatures, "s-", "STS")):
            pred = survival(z, temps)[m, k]
            y = labels[m, k].double()
            b = (pred * bins).floor().clamp(0, bins - 1).long()
            count = torch.bincount(b, minlength=bins).double()
            keep = count > 0
            mean_p = torch.zeros(bins, dtype=torch.float64).index_add_(0, b, pred)[keep] / count[keep]
            mean_y = torch.zeros(bins, dtype=torch.float64).index_add_(0, b, y)[keep] / count[keep]
            ax.plot(mean_p.tolist(), mean_y.tolist(), style, ms=3, label=name)
        ax.plot([0, 1], [0, 1], color="grey", lw=0.8)
        ax.set_title(f"slot {k}", fontsize=9)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_xlabel("predicted survival", fontsize=8)
        if k == 0:
            ax.set_ylabel("observed", fontsize=8)
            ax.legend(fontsize=7)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def save(path: str | Path, temperatures: torch.Tensor, rows: list[dict]) -> None:
    """Temperatures and the metric table as JSON, saved next to the draft."""
    Path(path).write_text(json.dumps({"sts_temperatures": [float(t) for t in temperatures], "metrics": rows},
                                     indent=2) + "\n")


def rollout_arrays(stats_list, gamma: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Engine statistics of full-block rounds (recorded with `record_proposals=True`) → (z, labels,
    verified) [N, γ]: label k = 1 iff drafts 0..k were accepted; slot k counts iff it was verified."""
    z, labels, verified = [], [], []
    for stats in stats_list:
        if len(stats.confidence_logits) != stats.rounds:
            raise ValueError("rollouts need confidence logits for every round (record_proposals=True, a DSpark drafter)")
        for logits, ell, a in zip(stats.confidence_logits, stats.proposal_lens, stats.accepted):
            z.append(logits)
            labels.append([1 if a > k else 0 for k in range(gamma)])
            verified.append([k < ell for k in range(gamma)])
    if not z:
        raise ValueError("no decode rounds to calibrate on")
    return torch.tensor(z), torch.tensor(labels), torch.tensor(verified)
