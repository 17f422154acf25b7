"""Training the V4-layout DSpark draft: its training forward equals the inference path block by
block, training raises acceptance on a bigram target, and checkpoints round-trip exactly."""

from __future__ import annotations

import functools

import torch

from dspark.checkpoint import load_weights
from dspark.config import DSparkFields, TrainConfig
from dspark.draft.v4 import V4DSparkDraft
from dspark.train.data import OnTheFly, target_features
from dspark.train.loss import LossConfig, sample_anchors
from dspark.train.trainer import DraftTrainer, weights_hash
from tests.compare import assert_close
from tests.helpers.bigram import bigram_target, chain_table
from tests.helpers.training import decode, sampled_sequences, tau

DS = DSparkFields(block_size=5, noise_token_id=23, target_layer_ids=(1, 2, 3), markov_rank=16)


@functools.lru_cache(maxsize=None)
def target():
    return bigram_target(chain_table(24, 3, 0), dspark=DS)


def draft(seed=0) -> V4DSparkDraft:
    return V4DSparkDraft.random(target().config, 2, seed=seed).attach(target())


def test_training_forward_equals_inference_blocks():
    d = draft().eval()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 24, (2, 40), generator=g)
    features, _ = target_features(target(), ids, d.tap_layers)
    mask = torch.ones(2, 40)
    anchors, keep = zip(*(sample_anchors(m, 6, g) for m in mask))
    anchors, keep = torch.stack(anchors), torch.stack(keep)
    keep[1, -1] = 0  # a dummy block
    with torch.no_grad():
        out = d.forward_train(ids, features, anchors, keep)
        assert torch.isfinite(out.draft_logits).all()
        rows = d.context_rows(d.project_context(features.flatten(0, 1)), torch.arange(40).repeat(2))
        for b in range(2):
            for k in range(6):
                if not keep[b, k]:
                    continue
                p = int(anchors[b, k])
                lo = max(0, p - d.context_window)
                ctx = [(r[b * 40 + lo:b * 40 + p].unsqueeze(0),) for (r,) in rows]
                block = torch.tensor([[int(ids[b, p])] + [d.block_input_token] * 4])
                h_pre, h = d.block_hidden(block, p + torch.arange(5).unsqueeze(0), ctx,
                                          torch.ones(1, p - lo, dtype=torch.bool))
                prev = torch.cat([block[:, :1], out.labels[b, k, :-1].unsqueeze(0)], dim=1)
                want = d.corrected_logits_tf(d.base_logits(h), prev, h.float())
                assert_close(out.draft_logits[b, k], want[0], atol=1e-4, rtol=1e-4, what=f"block {b},{k}")
                assert_close(out.confidence_logits[b, k], d.confidence_logits(h_pre.float(), prev)[0],
                             atol=1e-5, rtol=1e-4, what="confidence")


def test_training_raises_acceptance_and_checkpoints_round_trip(tmp_path):
    data = sampled_sequences(target(), 24, 80, seed=1)
    d = draft()
    heldout = [[5, 9, 1, 3], [7, 7, 2, 0], [11, 4, 6, 8], [1, 2, 3, 4]]
    before = tau(decode(target(), d, heldout, 1.0))
    cfg = TrainConfig(steps=120, batch_size=8, seq_len=64, num_anchors=8, lr=3e-3, checkpoint_every=60)
    trainer = DraftTrainer(d.train(), OnTheFly(target(), data, d.tap_layers, 8, cfg.seed), cfg, LossConfig.dspark(),
                           tmp_path)
    first = trainer.train_step(0)["loss"]
    last = trainer.train(progress=False)["loss"]
    after = tau(decode(target(), d, heldout, 1.0))
    assert last < 0.7 * first and after > before + 0.5, (first, last, before, after)
    fresh = draft(seed=7)
    load_weights(fresh, tmp_path / "checkpoint" / "model")
    assert weights_hash(fresh) == weights_hash(d)
