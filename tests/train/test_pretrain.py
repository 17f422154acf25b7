"""Target pretraining: the losses fall, the indexer is distilled toward the main attention, expert
bias balancing evens the load, and resume is exact."""

from __future__ import annotations

import functools
import json

import torch

from dspark.config import ModelConfig, TrainConfig
from dspark.model.attention import IndexerTargets
from dspark.model.target import DeepseekV4
from dspark.train.data import SequenceData
from dspark.train.pretrain import PretrainConfig, TargetTrainer, indexer_kl
from dspark.train.trainer import weights_hash
from tests.helpers.bigram import chain_table

V = 48


@functools.lru_cache(maxsize=None)
def bigram_sequences(n: int = 32, length: int = 100) -> tuple[torch.Tensor, ...]:
    table = chain_table(V, 3, 0).exp()
    g = torch.Generator().manual_seed(0)
    seqs = []
    for _ in range(n):
        x = [int(torch.randint(0, V, (1,), generator=g))]
        for _ in range(length - 1):
            x.append(int(torch.multinomial(table[x[-1]], 1, generator=g)))
        seqs.append(torch.tensor(x))
    return tuple(seqs)


def trainer(tmp, steps, seed=0, pretrain=PretrainConfig(), **kw):
    model = DeepseekV4.random(ModelConfig.tiny(vocab_size=V), seed=seed).train()
    cfg = TrainConfig(steps=steps, batch_size=4, seq_len=65, lr=3e-3, checkpoint_every=kw.pop("every", 1000), **kw)
    return TargetTrainer(model, SequenceData(list(bigram_sequences()), 65), cfg, pretrain, tmp)


def test_pretraining_lowers_every_loss(tmp_path):
    t = trainer(tmp_path, 60)
    first = t.train_step(0)
    last = t.train(progress=False)
    assert last["lm_loss"] < 0.6 * first["lm_loss"]
    assert last["mtp_loss"] < 0.75 * first["mtp_loss"]
    assert last["indexer_kl"] < 0.7 * first["indexer_kl"]


def test_bias_balancing_evens_expert_load(tmp_path):
    runs = {}
    for name, rate in (("on", 0.02), ("off", 0.0)):
        t = trainer(tmp_path / name, 40, pretrain=PretrainConfig(bias_update_rate=rate))
        gates = [layer.mlp.gate for layer in t.model.model.layers if layer.mlp.gate.kind == "score"]
        before = [g.e_score_correction_bias.clone() for g in gates]
        t.train(progress=False)
        log = [json.loads(line) for line in (tmp_path / name / "loss.jsonl").read_text().splitlines()]
        runs[name] = sum(r["expert_imbalance"] for r in log[-10:]) / 10
        moved = [not torch.equal(g.e_score_correction_bias, b) for g, b in zip(gates, before)]
        assert all(m == (rate > 0) for m in moved)
    assert runs["on"] < runs["off"], runs


def test_indexer_kl_is_zero_when_scores_match_the_mass():
    causal = torch.tensor([[[True, True, False], [True, True, True]]])
    mass = torch.tensor([[[0.25, 0.75, 0.0], [0.2, 0.3, 0.5]]])
    match = IndexerTargets(scores=mass.clamp(min=1e-30).log(), mass=mass, causal=causal)
    assert float(indexer_kl([match])) < 1e-6
    off = IndexerTargets(scores=torch.zeros(1, 2, 3), mass=mass, causal=causal)
    assert float(indexer_kl([off])) > 0.05


def test_pretraining_resume_is_exact(tmp_path):
    full = trainer(tmp_path / "full", 6, every=3)
    full.train(progress=False)
    split = trainer(tmp_path / "split", 6, every=3)
    split.train(progress=False, stop_after=4)
    resumed = trainer(tmp_path / "split", 6, seed=9, every=3)
    resumed.train(progress=False)
    assert weights_hash(resumed.model) == weights_hash(full.model)
