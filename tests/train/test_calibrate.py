"""Sequential Temperature Scaling lowers ECE on held-out rollouts and keeps the confidence ranking."""

from __future__ import annotations

import torch

from dspark.train import calibrate


def rollouts(n: int, gamma: int, seed: int, sharpness: float = 2.5):
    """Synthetic full-block rollouts from an over-confident head: the true conditional acceptance
    of slot k is σ(s_k); the head reports z_k = sharpness · s_k."""
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(n, gamma, generator=g) * 1.2 + torch.linspace(1.0, -0.5, gamma)
    accepted = torch.rand(n, gamma, generator=g) < torch.sigmoid(s)
    labels = accepted.long().cumprod(-1)
    verified = torch.ones(n, gamma, dtype=torch.bool)
    return sharpness * s, labels, verified


def test_sts_lowers_ece_and_keeps_ranking(tmp_path):
    z, y, m = rollouts(20000, 5, seed=0)
    temps = calibrate.fit_sts(z, y, m)
    z_test, y_test, m_test = rollouts(20000, 5, seed=1)
    rows = calibrate.report(z_test, y_test, m_test, temps)
    before, after = calibrate.survival(z_test, torch.ones(5)), calibrate.survival(z_test, temps)
    for k, r in enumerate(rows):
        assert r["ece_after"] < 0.5 * r["ece_before"] and r["ece_after"] < 0.02, r
        assert r["brier_after"] <= r["brier_before"] + 1e-4
        # Survival a_k multiplies differently scaled factors, so its ranking may move a little (the
        # per-slot ranking cannot, below); the 1000-bin AUROC also gains resolution when STS spreads
        # predictions piled into its lowest bin.
        exact = [calibrate.auroc(p[:, k], y_test[:, k], bins=None) for p in (before, after)]
        assert abs(exact[1] - exact[0]) < 0.01, (k, exact)
        assert abs(r["auroc_after"] - r["auroc_before"]) < 0.02, r
    assert (temps > 1.5).all(), temps  # an over-confident head is cooled
    # Per-slot confidences are a monotone transform of z: their ranking is exactly unchanged.
    c_sts = torch.sigmoid(z_test.double() / temps)
    in_z_order = c_sts.gather(0, z_test.argsort(0))
    assert (in_z_order[1:] >= in_z_order[:-1]).all()
    table = calibrate.format_table(rows)
    assert "ECE before" in table and len(table.splitlines()) == 6
    png = calibrate.reliability_diagram(z_test, y_test, m_test, temps, tmp_path / "reliability.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    calibrate.save(tmp_path / "sts.json", temps, rows)
    assert "sts_temperatures" in (tmp_path / "sts.json").read_text()


def test_only_verified_slots_count_and_calibrated_heads_stay_near_one():
    z, y, m = rollouts(20000, 4, seed=2, sharpness=1.0)
    m[:, 3] = False  # slot 3 never verified
    temps = calibrate.fit_sts(z, y, m)
    assert temps[3] == 1.0
    assert ((temps[:3] - 1).abs() < 0.35).all(), temps


def test_metrics_on_known_cases():
    pred = torch.tensor([0.1, 0.1, 0.9, 0.9])
    label = torch.tensor([0, 0, 1, 1])
    assert abs(calibrate.ece(pred, label) - 0.1) < 1e-6
    assert calibrate.auroc(pred, label) == 1.0
    assert calibrate.auroc(torch.full((4,), 0.5), label) == 0.5
    assert abs(calibrate.brier(pred, label) - 0.01) < 1e-7  # fp32 inputs


def test_bad_input_is_refused():
    import pytest

    z = torch.zeros(3, 2)
    with pytest.raises(ValueError, match="share one"):
        calibrate.fit_sts(z, torch.zeros(3, 3), torch.ones(3, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="NaN"):
        calibrate.fit_sts(torch.full((3, 2), float("nan")), torch.zeros(3, 2), torch.ones(3, 2, dtype=torch.bool))
