"""Draft training end to end on bigram targets: acceptance rises, resume is exact, and the Markov
head does what it exists for (conditioning on the token sampled at the previous slot)."""

from __future__ import annotations

import functools
import json

import pytest
import torch

from dspark.config import TrainConfig
from dspark.config import DraftConfig
from dspark.draft.deepspec import DraftModel
from dspark.train.data import FeatureShards, OnTheFly
from dspark.train.loss import LossConfig
from dspark.train.trainer import DraftTrainer, weights_hash
from tests.helpers.bigram import bigram_target, chain_table
from tests.helpers.training import decode, sampled_sequences, tau


def make_draft(target, kind: str, seed: int = 0) -> DraftModel:
    """A DeepSpec-layout draft for a bigram target: hidden size = the target's, frozen copies of its
    embedding and LM head; the last token is the mask token."""
    v, d = target.config.vocab_size, target.config.hidden_size
    rank = 0 if kind == "dflash" else 16
    cfg = DraftConfig.tiny(vocab_size=v, mask_token_id=v - 1, target_layer_ids=(1, 2), num_target_layers=4,
                           target_hidden_size=d, hidden_size=d, num_layers=2, num_heads=4, num_kv_heads=2,
                           head_dim=14, intermediate_size=96, markov_rank=rank, markov_head_type="vanilla",
                           has_confidence_head=rank > 0, confidence_with_markov=rank > 0, block_size=5)
    draft = DraftModel.random(cfg, seed=seed)
    with torch.no_grad():
        draft.embed_tokens.weight.copy_(target.model.embed_tokens.weight)
        draft.lm_head.weight.copy_(target.lm_head.weight)
    return draft


def train(draft, target, data, kind: str, steps: int, out_dir, **kw) -> DraftTrainer:
    cfg = TrainConfig(steps=steps, batch_size=8, seq_len=64, num_anchors=8, lr=3e-3, checkpoint_every=1000, **kw)
    loss = LossConfig.dflash() if kind == "dflash" else LossConfig.dspark()
    return DraftTrainer(draft, OnTheFly(target, data, draft.config.target_layer_ids, 8, cfg.seed), cfg, loss, out_dir)


@functools.lru_cache(maxsize=None)
def chain_target():
    return bigram_target(chain_table(24, 3, 0))


@pytest.mark.parametrize("kind", ["dspark", "dflash"])
def test_training_lowers_loss_and_raises_acceptance(kind, tmp_path):
    target = chain_target()
    data = sampled_sequences(target, 32, 80, seed=1)
    draft = make_draft(target, kind)
    heldout = [[5, 9, 1, 3], [7, 7, 2, 0], [11, 4, 6, 8], [1, 2, 3, 4]]
    before = {t: tau(decode(target, draft, heldout, t)) for t in (0.0, 1.0)}
    trainer = train(draft.train(), target, data, kind, 300, tmp_path)
    first = trainer.train_step(0)["loss"]
    last = trainer.train(progress=False)["loss"]
    after = {t: tau(decode(target, draft, heldout, t)) for t in (0.0, 1.0)}
    assert last < 0.5 * first
    assert after[1.0] > before[1.0] + 0.5, (kind, before, after)
    # Greedy paths of a random bigram table fall into short loops through near-tied successors; a
    # CE-only DFlash learns the sampled distribution and can miss those argmaxes, so only DSpark's
    # greedy gain is asserted (DFlash's is reported by `dspark eval`).
    if kind == "dspark":
        assert after[0.0] > before[0.0] + 0.5, (kind, before, after)
    log = [json.loads(line) for line in (tmp_path / "loss.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(300))


def test_resume_equals_uninterrupted(tmp_path):
    target = chain_target()
    data = sampled_sequences(target, 8, 80, seed=2)
    full = train(make_draft(target, "dspark").train(), target, data, "dspark", 12, tmp_path / "full",
                 warmup_frac=0.25)
    full.config = TrainConfig(**{**full.config.__dict__, "checkpoint_every": 5})
    full.train(progress=False)

    first = train(make_draft(target, "dspark").train(), target, data, "dspark", 12, tmp_path / "split",
                  warmup_frac=0.25)
    first.config = TrainConfig(**{**first.config.__dict__, "checkpoint_every": 5})
    first.train(progress=False, stop_after=7)  # stopped mid-run: its last checkpoint is step 5
    resumed = train(make_draft(target, "dspark", seed=99).train(), target, data, "dspark", 12, tmp_path / "split",
                    warmup_frac=0.25)
    resumed.config = TrainConfig(**{**resumed.config.__dict__, "checkpoint_every": 5})
    resumed.train(progress=False)
    assert resumed.step == 12
    assert weights_hash(resumed.draft) == weights_hash(full.draft)
    steps = [json.loads(line)["step"] for line in (tmp_path / "split" / "loss.jsonl").read_text().splitlines()]
    assert steps == list(range(12))


def test_feature_shards_reproduce_on_the_fly_batches(tmp_path):
    target = chain_target()
    data = sampled_sequences(target, 6, 80, seed=4)
    FeatureShards.write(tmp_path / "cache", target, data, (1, 2), windows=20, seed=0, shard_size=8)
    cached = FeatureShards(tmp_path / "cache", batch_size=4, seed=0)
    batch = cached.batch(3)
    from dspark.train.data import target_features

    features, hidden = target_features(target, batch.input_ids, (1, 2))
    assert torch.equal(features, batch.features) and torch.equal(hidden, batch.last_hidden)
    assert len(cached.manifest["shards"]) == 3


# ---------------------------------------------------------------------------- the Markov target
S, A, B = 0, 1, 2
X = [3, 4, 5, 6, 7]
Y = [8, 9, 10, 11, 12]


@functools.lru_cache(maxsize=None)
def markov_target():
    """S → A or B (50/50); A → X1 → … → X5 → S; B → Y1 → … → Y5 → S: after the ambiguous token the
    continuation is determined by WHICH token was sampled there."""
    v = 16
    table = torch.full((v, v), -30.0)
    table[S, A] = table[S, B] = 0.0
    for chain, head in ((X, A), (Y, B)):
        prev = head
        for t in chain:
            table[prev, t] = 0.0
            prev = t
        table[prev, S] = 0.0
    for t in range(13, v):
        table[t, S] = 0.0
    return bigram_target(table.log_softmax(-1))


def conditional_after_ambiguity(results, prompts) -> float:
    """P(slot after an accepted A/B draft is accepted), over rounds that verified that slot."""
    hits = total = 0
    for prompt, res in zip(prompts, results):
        for proposal, ell, a in zip(res.stats.proposals, res.stats.proposal_lens, res.stats.accepted):
            for j in range(ell - 1):
                if proposal[j] in (A, B) and a > j:
                    total += 1
                    hits += a > j + 1
    assert total >= 20, f"only {total} ambiguous slots were verified"
    return hits / total


def test_markov_head_follows_the_sampled_token(tmp_path):
    target = markov_target()
    data = sampled_sequences(target, 24, 80, seed=5)
    prompts = [[S], [X[2]], [Y[0]], [13], [S, B], [A], [X[4]], [Y[3]], [14], [15], [S, A], [Y[4]]]
    rates = {}
    for kind in ("dspark", "dflash"):
        draft = make_draft(target, kind)
        train(draft.train(), target, data, kind, 200, tmp_path / kind).train(progress=False)
        results = decode(target, draft, prompts, 1.0, new_tokens=60, record_proposals=True)
        rates[kind] = conditional_after_ambiguity(results, prompts)
    # observed: dspark 0.97, dflash 0.55 (a 50/50 guess, as it must be without the sampled token)
    assert rates["dspark"] >= 0.9, rates
    assert rates["dflash"] <= 0.75 and rates["dspark"] - rates["dflash"] >= 0.2, rates
