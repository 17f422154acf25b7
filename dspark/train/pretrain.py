"""Pretraining a small V4 target from scratch (the nano recipe): next-token loss, the MTP module
trained jointly, the lightning indexer distilled toward the main attention, and aux-loss-free
expert balancing.

    loss = CE(next token) + mtp_weight · CE(token after next, MTP) + indexer_weight · KL_indexer

Indexer distillation (DeepSeek-V3.2 style): per CSA layer and query, KL(p_attn ‖ softmax(scores))
over the causal compressed entries, where p_attn is the main attention's mass over those entries
(per-head softmax over entries, averaged over heads, no gradient) and the scores come from
detached trunk inputs — the loss trains the indexer and nothing else. Its top-k selection stays
discrete.

Aux-loss-free balancing (DeepSeek-V3): after each optimizer step every score-routed layer moves
its correction bias toward under-loaded experts, bias_e += rate · sign(mean load − load_e). The
bias only steers selection, never the routing weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dspark.config import TrainConfig
from dspark.model.attention import IndexerTargets
from dspark.model.mtp import mtp_forward
from dspark.train.data import SequenceData, step_generator
from dspark.train.trainer import Trainer


@dataclass(frozen=True)
class PretrainConfig:
    mtp_weight: float = 0.3
    indexer_weight: float = 1.0
    bias_update_rate: float = 1e-3

    def __post_init__(self):
        if self.mtp_weight < 0 or self.indexer_weight < 0 or self.bias_update_rate < 0:
            raise ValueError("pretraining weights and the bias update rate must be >= 0")


def indexer_kl(targets: list[IndexerTargets]) -> torch.Tensor:
    """Mean over CSA layers and queries with at least one causal entry of KL(mass ‖ softmax(scores))."""
    losses = []
    for t in targets:
        has = t.causal.any(-1)  # [B, S]
        if not bool(has.any()):
            continue
        log_q = t.scores.masked_fill(~t.causal, float("-inf")).log_softmax(-1)
        kl = torch.where(t.mass > 0, t.mass * (t.mass.clamp(min=1e-30).log() - log_q), 0.0).sum(-1)  # [B, S]
        losses.append(kl[has].mean())
    return torch.stack(losses).mean() if losses else torch.zeros(())


@torch.no_grad()
def balance_expert_bias_(model, expert_load: torch.Tensor, rate: float) -> None:
    """Move each score-routed layer's correction bias toward its under-loaded experts."""
    for layer, load in zip(model.model.layers, expert_load):
        gate = layer.mlp.gate
        if gate.kind != "score":
            continue
        load = load.float()
        gate.e_score_correction_bias.add_(rate * torch.sign(load.mean() - load))


def imbalance(expert_load: torch.Tensor) -> float:
    """max / mean expert load over score-routed assignments (1 = perfectly balanced)."""
    load = expert_load.float()
    return float((load.max(-1).values / load.mean(-1).clamp(min=1e-9)).mean())


class TargetTrainer(Trainer):
    def __init__(self, model, data: SequenceData, config: TrainConfig, pretrain: PretrainConfig, out_dir):
        if data.seq_len < 3:
            raise ValueError("pretraining windows need at least 3 tokens (next token and MTP's token after next)")
        super().__init__(model, config, out_dir)
        self.data, self.pretrain = data, pretrain
        self._load = None

    def compute(self, step: int):
        ids, _ = self.data.windows(step_generator(self.config.seed, step, "windows"), self.config.batch_size)
        inputs, labels = ids[:, :-1], ids[:, 1:]  # [B, S]
        model, cfg = self.model, self.pretrain
        targets: list[IndexerTargets] = []
        self._load = torch.zeros(model.config.num_layers, model.config.n_routed_experts, dtype=torch.long)
        out = model.run(inputs, collect=targets, expert_load=self._load)
        lm = F.cross_entropy(out.logits.flatten(0, 1), labels.flatten())
        loss, record = lm, {"lm_loss": float(lm.detach())}
        if model.has_mtp and cfg.mtp_weight > 0:
            # MTP at row t reads H_t and x_{t+1} and predicts x_{t+2}.
            mtp_logits, _ = mtp_forward(model, out.streams[:, :-1], inputs[:, 1:])
            mtp = F.cross_entropy(mtp_logits.flatten(0, 1), labels[:, 1:].flatten())
            loss = loss + cfg.mtp_weight * mtp
            record["mtp_loss"] = float(mtp.detach())
        if targets and cfg.indexer_weight > 0:
            idx = indexer_kl(targets)
            loss = loss + cfg.indexer_weight * idx
            record["indexer_kl"] = float(idx.detach())
        record["expert_imbalance"] = imbalance(self._load)
        return loss, record

    def after_step(self, step: int) -> None:
        balance_expert_bias_(self.model, self._load, self.pretrain.bias_update_rate)
