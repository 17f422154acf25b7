"""Anchor sampling, supervision masks, the DSpark loss against a per-slot transcription of
dspark.md §4.4, its data-parallel form, and gradients through the draft (the golden fixture covers
DeepSpec parity: tests/model/test_draft_golden.py)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, strategies as st

from dspark.config import DraftConfig
from dspark.draft.deepspec import DraftModel
from dspark.train.loss import (LossConfig, aligned_target_logits, anchor_candidates, build_eval_mask, combine_terms,
                               dspark_loss, sample_anchors, slot_weights)
from tests.compare import assert_close


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ============================================================================ anchors
@given(seed=st.integers(0, 2**31 - 1), b=st.integers(1, 4), s=st.integers(1, 40), k=st.integers(1, 24),
       density=st.sampled_from([0.0, 0.3, 0.8, 1.0]))
def test_sample_anchors_invariants(seed, b, s, k, density):
    loss_mask = (torch.rand(b, s, generator=gen(seed)) < density).float()
    anchors, keep = sample_anchors(loss_mask, k, gen(seed + 1))
    assert anchors.shape == keep.shape == (b, k) and anchors.dtype == torch.int64 and keep.dtype == torch.bool
    for row in range(b):
        valid = {p for p in range(s - 1) if loss_mask[row, p] == 1 and loss_mask[row, p + 1] == 1}
        n = min(len(valid), k)
        assert keep[row].tolist() == [True] * n + [False] * (k - n)  # kept first, then dummies
        chosen = anchors[row, :n].tolist()
        assert chosen == sorted(set(chosen)) and set(chosen) <= valid  # distinct, ascending, valid
        assert (anchors[row, n:] == 0).all()
    again = sample_anchors(loss_mask, k, gen(seed + 1))
    assert torch.equal(again[0], anchors) and torch.equal(again[1], keep)


def test_sample_anchors_is_uniform_without_replacement():
    """Each of n valid positions is drawn with probability k/n, pairs with k(k−1)/(n(n−1))."""
    rows, s, k = 6000, 20, 4
    loss_mask = torch.ones(rows, s)
    loss_mask[:, [0, 7, 8, 15]] = 0  # valid anchors: 1..5, 9..13, 16..18
    valid = anchor_candidates(loss_mask)[0].nonzero().flatten().tolist()
    n = len(valid)
    anchors, keep = sample_anchors(loss_mask, k, gen(0))
    assert keep.all()
    hits = torch.zeros(s, dtype=torch.long).scatter_add_(0, anchors.flatten(), torch.ones(rows * k, dtype=torch.long))
    p = k / n
    sigma = math.sqrt(rows * p * (1 - p))
    assert set(hits.nonzero().flatten().tolist()) == set(valid)
    assert (hits[valid].float() - rows * p).abs().max() < 5 * sigma
    pair = ((anchors == valid[0]).any(1) & (anchors == valid[-1]).any(1)).float().mean()
    assert abs(pair - k * (k - 1) / (n * (n - 1))) < 0.015


def test_sample_anchors_keeps_leading_dims():
    """One sequence [S] or any batch shape [..., S]: the same rule per sequence."""
    loss_mask = (torch.rand(2, 3, 15, generator=gen(5)) < 0.7).float()
    anchors, keep = sample_anchors(loss_mask, 6, gen(6))
    assert anchors.shape == keep.shape == (2, 3, 6)
    flat = sample_anchors(loss_mask.view(6, 15), 6, gen(6))
    assert torch.equal(flat[0], anchors.view(6, 6)) and torch.equal(flat[1], keep.view(6, 6))
    one, one_keep = sample_anchors(loss_mask[1, 2], 6, gen(7))
    assert one.shape == one_keep.shape == (6,)
    valid = anchor_candidates(loss_mask[1, 2])
    assert int(one_keep.sum()) == min(int(valid.sum()), 6) and valid[one[one_keep]].all()


def test_sample_anchors_refuses_zero_anchors():
    with pytest.raises(ValueError, match="num_anchors"):
        sample_anchors(torch.ones(1, 5), 0)


def test_eval_mask_matches_definition():
    b, s, k, g = 3, 17, 6, 4
    loss_mask = (torch.rand(b, s, generator=gen(1)) < 0.8).float()
    anchors = torch.randint(0, s - 1, (b, k), generator=gen(2))
    keep = torch.rand(b, k, generator=gen(3)) < 0.7
    got = build_eval_mask(anchors, keep, loss_mask, g)
    for bi in range(b):
        for ki in range(k):
            p, alive = int(anchors[bi, ki]), bool(keep[bi, ki])
            for i in range(g):
                alive = alive and p + i + 1 < s and loss_mask[bi, p + i + 1] == 1
                assert bool(got[bi, ki, i]) == alive
    w = slot_weights(got, 4.0)
    assert_close(w, got.float() * torch.exp(-torch.arange(g) / 4.0), what="slot weights")


# ============================================================================ loss
def random_step(head: dict, seed: int = 0, b: int = 2, s: int = 23, k: int = 6):
    model = DraftModel.random(DraftConfig.tiny(**head), seed=seed)
    cfg = model.config
    ids = torch.randint(0, cfg.mask_token_id, (b, s), generator=gen(seed + 1))
    feats = torch.randn(b, s, cfg.context_width, generator=gen(seed + 2))
    last_hidden = torch.randn(b, s, cfg.hidden_size, generator=gen(seed + 3))
    loss_mask = torch.ones(b, s)
    loss_mask[:, :4] = 0
    loss_mask[0, 12] = 0
    anchors, keep = sample_anchors(loss_mask, k, gen(seed + 4))
    keep[1, -1] = False  # at least one dummy block
    anchors[1, -1] = 0
    return model, ids, feats, last_hidden, loss_mask, anchors, keep


DSPARK = dict()
DFLASH = dict(markov_rank=0, has_confidence_head=False, confidence_with_markov=False)


@pytest.mark.parametrize("head, config", [(DSPARK, LossConfig.dspark()), (DFLASH, LossConfig.dflash()),
                                          (DSPARK, LossConfig(loss_decay_gamma=None, l1_loss_alpha=0.0))])
@torch.no_grad()
def test_loss_matches_per_slot_transcription(head, config):
    model, ids, feats, last_hidden, loss_mask, anchors, keep = random_step(head)
    b, s = ids.shape
    out = model.forward_train(ids, feats, anchors, keep)
    target = aligned_target_logits(model.base_logits, last_hidden, anchors, keep, model.config.block_size)
    result = dspark_loss(out, target, loss_mask, anchors, keep, config)

    sums = dict(ce=0.0, l1=0.0, conf=0.0, w=0.0)
    for bi in range(b):
        for ki in range(anchors.shape[1]):
            p, alive = int(anchors[bi, ki]), bool(keep[bi, ki])
            for i in range(model.config.block_size):
                alive = alive and p + i + 1 < s and loss_mask[bi, p + i + 1] == 1
                if not alive:
                    break
                w = 1.0 if config.loss_decay_gamma is None else math.exp(-i / config.loss_decay_gamma)
                logits = out.draft_logits[bi, ki, i].double()
                t = model.base_logits(last_hidden[bi, p + i]).double()  # the target's distribution at p+i
                l1 = float((logits.softmax(-1) - t.softmax(-1)).abs().sum())
                sums["w"] += w
                sums["ce"] += w * float(torch.logsumexp(logits, -1) - logits[ids[bi, p + i + 1]])
                sums["l1"] += w * l1
                if out.confidence_logits is not None:
                    z, c = float(out.confidence_logits[bi, ki, i]), min(max(1 - l1 / 2, 0.0), 1.0)
                    sums["conf"] += w * (max(z, 0) - z * c + math.log1p(math.exp(-abs(z))))
    terms = result.terms
    assert_close(terms["ce_loss_num"], torch.tensor(sums["ce"]), rtol=1e-5, what="ce num")
    assert_close(terms["ce_loss_den"], torch.tensor(sums["w"]), what="den")
    l1_on, conf_on = config.l1_loss_alpha > 0, out.confidence_logits is not None
    assert_close(terms["l1_loss_num"], torch.tensor(sums["l1"] if l1_on else 0.0), rtol=1e-5, what="l1 num")
    assert_close(terms["confidence_loss_num"], torch.tensor(sums["conf"]), rtol=1e-5, what="conf num")
    assert float(terms["l1_loss_den"]) == (float(terms["ce_loss_den"]) if l1_on else 0.0)
    assert float(terms["confidence_loss_den"]) == (float(terms["ce_loss_den"]) if conf_on else 0.0)
    want = sum(a * sums[t] / (sums["w"] + 1e-6) for a, t, on in
               ((config.ce_loss_alpha, "ce", True), (config.l1_loss_alpha, "l1", l1_on),
                (config.confidence_head_alpha, "conf", conf_on)) if on)
    assert_close(result.loss, torch.tensor(want), rtol=1e-5, what="loss")
    assert ("train/l1_loss" in result.metrics) == l1_on
    assert ("train/confidence_bias" in result.metrics) == conf_on
    assert_close(result.metrics["train/sampled_anchors_abs"].value, keep.float().sum(1).mean(), what="anchors")


def test_data_parallel_combination():
    """Global denominators and the world-size factor: averaging the ranks' losses gives the global mean."""
    model, ids, feats, last_hidden, loss_mask, anchors, keep = random_step(DSPARK, b=2)
    config = LossConfig.dspark()
    parts = []
    for r in range(2):  # two "ranks", one sequence each
        sl = slice(r, r + 1)
        out = model.forward_train(ids[sl], feats[sl], anchors[sl], keep[sl])
        target = aligned_target_logits(model.base_logits, last_hidden[sl], anchors[sl], keep[sl], 5)
        parts.append(dspark_loss(out, target, loss_mask[sl], anchors[sl], keep[sl], config).terms)
    dens = {key: parts[0][key] + parts[1][key] for key in parts[0] if key.endswith("_den")}
    ddp = sum(combine_terms(t, config, dens, world_size=2) for t in parts) / 2
    out = model.forward_train(ids, feats, anchors, keep)
    target = aligned_target_logits(model.base_logits, last_hidden, anchors, keep, 5)
    whole = dspark_loss(out, target, loss_mask, anchors, keep, config).loss
    assert_close(ddp, whole, rtol=1e-5, what="DDP-combined loss")


@pytest.mark.parametrize("alphas, reaches", [
    (dict(ce_loss_alpha=0.0, l1_loss_alpha=0.0, confidence_head_alpha=1.0),
     ("markov_head.markov_w1.weight", "confidence_head.proj.weight", "layers.0.self_attn.q_proj.weight", "fc.weight")),
    (dict(ce_loss_alpha=0.0, l1_loss_alpha=1.0, confidence_head_alpha=0.0),
     ("markov_head.markov_w2.weight", "layers.1.mlp.down_proj.weight", "hidden_norm.weight")),
])
def test_gradients_reach_the_backbone_and_heads(alphas, reaches):
    model, ids, feats, last_hidden, loss_mask, anchors, keep = random_step(DSPARK)
    out = model.forward_train(ids, feats, anchors, keep)
    target = aligned_target_logits(model.base_logits, last_hidden, anchors, keep, 5)
    dspark_loss(out, target, loss_mask, anchors, keep, LossConfig(**alphas)).loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert all(g is None or g.isfinite().all() for g in grads.values())  # dummy blocks leak no NaN
    for name in reaches:
        assert grads[name] is not None and grads[name].abs().sum() > 0, name
    if alphas["confidence_head_alpha"] == 0:
        assert not grads["confidence_head.proj.weight"].any()


def test_target_logits_are_constant():
    model, ids, feats, last_hidden, loss_mask, anchors, keep = random_step(DSPARK)
    target = aligned_target_logits(model.base_logits, last_hidden.requires_grad_(), anchors, keep, 5)
    assert not target.requires_grad and target.dtype == torch.float32


def test_loss_config_checks():
    with pytest.raises(ValueError, match="ce_loss_alpha"):
        LossConfig(ce_loss_alpha=-1.0)
    with pytest.raises(ValueError, match="loss_decay_gamma"):
        LossConfig(loss_decay_gamma=0.0)
    model, ids, feats, last_hidden, loss_mask, anchors, keep = random_step(DFLASH)
    out = model.forward_train(ids, feats, anchors, keep)
    target = aligned_target_logits(model.base_logits, last_hidden, anchors, keep, 5)
    with pytest.raises(ValueError, match="no confidence head"):
        dspark_loss(out, target, loss_mask, anchors, keep, LossConfig.dspark())
