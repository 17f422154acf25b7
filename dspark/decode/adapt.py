"""Adapting draft confidences to the acceptances observed so far (issue #9).

A calibrated confidence head is right on average; a request that drifts (say from code into prose)
is accepted less than its confidences claim, and should verify less. Per request and slot k the
tracker keeps exponential moving averages of what was predicted (c_k) and what happened (slot k
accepted) over the rounds in which slot k was verified with its prefix accepted, and scales the
next rounds' confidences by their ratio:

    c'_k = clamp(c_k · obs_k / pred_k, 0, 1)

Only finished rounds feed the averages, so the correction never looks at the round being decided
(the schedulers stay non-anticipating). A new request starts from the running averages of its
sampling configuration (greedy or sampled), then follows its own acceptances.
"""

from __future__ import annotations

import torch


class AcceptanceTracker:
    def __init__(self, max_batch: int, gamma: int, *, decay: float = 0.8, prior_weight: float = 4.0,
                 device="cpu"):
        if not 0 < decay < 1:
            raise ValueError(f"decay must be in (0, 1), got {decay}")
        self.decay, self.prior_weight = decay, prior_weight
        z = torch.zeros(max_batch, gamma, device=device)
        # Weighted sums (obs, pred, weight) per request and slot, and per configuration (greedy, sampled).
        self.obs, self.pred, self.weight = z.clone(), z.clone(), z.clone()
        g = torch.zeros(2, gamma, device=device)
        self.cfg_obs, self.cfg_pred, self.cfg_weight = g.clone(), g.clone(), g.clone()

    @staticmethod
    def bucket(temperature: torch.Tensor) -> torch.Tensor:
        return (temperature > 0).long()

    def reset(self, slot: int, temperature: float) -> None:
        """Host-side, at admission: start from the configuration's averages (a few rounds' worth)."""
        b = int(temperature > 0)
        w = self.cfg_weight[b]
        scale = torch.where(w > 0, self.prior_weight / w.clamp(min=1e-9), 0.0)
        self.obs[slot] = self.cfg_obs[b] * scale
        self.pred[slot] = self.cfg_pred[b] * scale
        self.weight[slot] = torch.where(w > 0, self.prior_weight, 0.0)

    def correct(self, confidence: torch.Tensor) -> torch.Tensor:
        """[R, γ] confidences → corrected confidences (unchanged where nothing was observed yet)."""
        ratio = torch.where(self.pred > 1e-6, self.obs / self.pred.clamp(min=1e-6), 1.0)
        return (confidence * ratio).clamp(0.0, 1.0)

    def update(self, confidence: torch.Tensor, verify_len: torch.Tensor, accepted: torch.Tensor,
               active: torch.Tensor, temperature: torch.Tensor) -> None:
        """After a round: slot k counts when it was verified and slots < k were accepted. State is
        updated in place (a CUDA graph replays the addresses it captured)."""
        gamma = confidence.shape[1]
        k = torch.arange(gamma, device=confidence.device)
        reached = active.unsqueeze(-1) & (k < verify_len.unsqueeze(-1)) & (accepted.unsqueeze(-1) >= k)
        outcome = (accepted.unsqueeze(-1) > k).float()
        d = torch.where(reached, self.decay, 1.0)
        add = reached.float()
        self.obs.copy_(self.obs * d + add * outcome)
        self.pred.copy_(self.pred * d + add * confidence)
        self.weight.copy_(self.weight * d + add)
        # Configuration averages: plain sums over every request of the bucket, decayed per round.
        b = torch.zeros(temperature.shape[0], 2, device=temperature.device)
        b = b.scatter_(1, self.bucket(temperature).unsqueeze(-1), 1.0) * active.float().unsqueeze(-1)  # [R, 2]
        seen = (b.t() @ add) > 0  # [2, γ]
        dg = torch.where(seen, self.decay, 1.0)
        self.cfg_obs.copy_(self.cfg_obs * dg + b.t() @ (add * outcome))
        self.cfg_pred.copy_(self.cfg_pred * dg + b.t() @ (add * confidence))
        self.cfg_weight.copy_(self.cfg_weight * dg + b.t() @ add)
