"""The draft model and the DSpark loss against DeepSpec's own outputs, for both of DeepSpec's layouts.

Qwen3 layout: ../shared/data/deepspec_golden (vanilla / gated / rnn Markov heads with a confidence head,
and DFlash; context rows 0..19, anchor at 20; round 2 appends rows 20..22, anchor at 23; training on a
28-token sequence). Gemma-4 layout: tests/data/deepspec_gemma4_golden, written by
tools/make_deepspec_gemma4_golden.py with DeepSpec's code (DSpark with attention_k_eq_v, and DFlash;
rows 0..15, anchor at 16; round 2 appends rows 16..18; training on 24 tokens). Every case is loaded from its
DeepSpec checkpoint (bf16, upcast to fp32) and fed the fixture's inputs: inference round 1, round 2 through
the same per-request context cache, both rounds as one padded batch, and one training step (8 fixed
anchors). Float outputs are compared at the fp32 table tolerance (observed max error 8e-6, on a loss
numerator of ~119); ids, masks and proposal lengths exactly. The Gemma fixture's config facts, its
checkpoint round trip and refusals are in test_deepspec_gemma4.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import pytest
import torch
from safetensors.torch import load_file

from dspark import ops
from dspark.checkpoint import load_draft
from dspark.train.loss import LossConfig, aligned_target_logits, build_eval_mask, dspark_loss
from tests.compare import assert_close
from tests.helpers.deepspec_golden import context_cache, greedy_block, proposal_length

QWEN3 = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "deepspec_golden"
GEMMA4 = Path(__file__).resolve().parents[1] / "data" / "deepspec_gemma4_golden"
GAMMA = 5


class Fixture(NamedTuple):
    path: Path
    ctx: int  # context rows of round 1 (the anchor sits at this position)
    new: int  # rows round 2 appends


CASES = {**{f"qwen3-{n}": Fixture(QWEN3 / n, 20, 3) for n in ("dspark_vanilla", "dspark_gated", "dspark_rnn", "dflash")},
         **{f"gemma4-{n}": Fixture(GEMMA4 / n, 16, 3) for n in ("dspark", "dflash")}}


@pytest.fixture(scope="module", params=list(CASES))
def case(request):
    fixture = CASES[request.param]
    if not fixture.path.is_dir():
        pytest.skip(f"DeepSpec golden fixture not found at {fixture.path} (CI clones the repo next to ../shared)")
    model = load_draft(fixture.path / "checkpoint", dtype=torch.float32)
    name = "dflash" if request.param.endswith("dflash") else "dspark"
    return name, model, load_file(fixture.path / "golden.safetensors"), fixture


@pytest.mark.parametrize("name", ["dspark_vanilla", "dspark_gated", "dspark_rnn", "dflash"])
def test_qwen3_checkpoint_config(name):
    if not QWEN3.is_dir():
        pytest.skip(f"DeepSpec golden fixture not found at {QWEN3}")
    model = load_draft(QWEN3 / name / "checkpoint", dtype=torch.float32)
    cfg = model.config
    assert (cfg.block_size, cfg.mask_token_id, cfg.num_target_layers) == (GAMMA, 500, 4)
    assert cfg.target_layer_ids == (0, 1, 2)
    assert (cfg.hidden_size, cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (64, 3, 4, 2, 16)
    assert cfg.rope_theta == 1e6 and cfg.vocab_size == 512
    if name == "dflash":
        assert cfg.markov_rank == 0 and not cfg.has_confidence_head
        assert model.markov_head is None and model.confidence_head is None
    else:
        assert cfg.markov_rank == 8 and cfg.markov_head_type == name.split("_")[1]
        assert cfg.has_confidence_head and cfg.confidence_with_markov


def test_round1(case):
    name, model, g, fx = case
    outs = []
    hooks = [layer.register_forward_hook(lambda mod, args, out: outs.append(out[:, 0])) for layer in model.layers]
    try:
        c = model.project_context(g["ctx_features"])
        assert_close(c, g["debug_ctx_proj"], what="C = hidden_norm(fc(features))")
        assert_close(model.embed(g["block_input_ids"]), g["debug_block_embed"], what="(scaled) block embedding")
        pos = (g["anchor_pos"] + torch.arange(GAMMA))[None]
        assert torch.equal(torch.cat([torch.arange(fx.ctx), pos[0]]), g["position_ids"])
        h = model.block_hidden(g["block_input_ids"][None], pos, context_cache(model, g["ctx_features"], 0),
                               torch.ones(1, fx.ctx, dtype=torch.bool))[0]
    finally:
        for hook in hooks:
            hook.remove()
    for i, out in enumerate(outs):
        assert_close(out[0], g[f"debug_layer{i}_out"], what=f"layer {i} output")
    assert_close(h, g["h"], what="h")
    U = model.base_logits(h)
    assert U.dtype == torch.float32
    cap = model.config.logit_softcap
    assert cap is None or U.abs().max() < cap
    assert_close(U, g["U"], what="U (soft-capped where the layout says so)")

    logits_tf = model.corrected_logits_tf(U, g["prev_ids_tf"], h)
    assert_close(logits_tf, g["logits_tf"], what="teacher-forced corrected logits")
    probs = ops.probs(logits_tf, torch.full((GAMMA,), 0.8), torch.zeros(GAMMA, dtype=torch.long), torch.ones(GAMMA))
    assert_close(probs, g["probs_tf_t0p8"], what="softmax(logits_tf / 0.8)")
    conf = model.confidence_logits(h, g["prev_ids_tf"])
    if name == "dflash":
        assert conf is None
    else:
        assert conf.dtype == torch.float32
        assert_close(conf, g["conf_logits_tf"], what="teacher-forced confidence logits")
        assert_close(torch.sigmoid(conf), g["conf_probs_tf"], what="teacher-forced confidence")


def test_round1_greedy_block(case):
    name, model, g, fx = case
    h, U = g["h"][None], g["U"][None]
    tokens, corrected, conf = greedy_block(model, U, h, g["anchor_id"])
    assert tokens[0].tolist() == g["greedy_tokens"].tolist()
    assert_close(corrected[0], g["logits_greedy"], what="greedy corrected logits")
    if name == "dflash":
        assert conf is None
    else:
        assert_close(conf[0], g["conf_logits_greedy"], what="greedy confidence logits")
        if "conf_probs_greedy" in g:  # the Qwen3 fixture also stores the probabilities
            assert_close(torch.sigmoid(conf[0]), g["conf_probs_greedy"], what="greedy confidence")
    lens = [proposal_length(None if conf is None else conf[0], tau, GAMMA) for tau in g["conf_thresholds"].tolist()]
    assert lens == g["proposal_lens"].tolist()


def test_round2_through_the_context_cache(case):
    """Round 2 appends K/V for `new` rows to the round-1 cache."""
    name, model, g, fx = case
    cache = [(torch.cat([k0, k1], 1), torch.cat([v0, v1], 1)) for (k0, v0), (k1, v1) in
             zip(context_cache(model, g["ctx_features"], 0), context_cache(model, g["r2_ctx_features_new"], fx.ctx))]
    assert torch.equal(torch.arange(fx.ctx, fx.ctx + fx.new + GAMMA), g["r2_position_ids"])
    pos = (g["r2_anchor_pos"] + torch.arange(GAMMA))[None]
    block = torch.full((1, GAMMA), model.config.mask_token_id)
    block[0, 0] = g["r2_anchor_id"]
    h = model.block_hidden(block, pos, cache, torch.ones(1, fx.ctx + fx.new, dtype=torch.bool))
    assert_close(h[0], g["r2_h"], what="round-2 h")
    U = model.base_logits(h)
    assert_close(U[0], g["r2_U"], what="round-2 U")
    tokens, corrected, conf = greedy_block(model, U, h, g["r2_anchor_id"])
    assert tokens[0].tolist() == g["r2_greedy_tokens"].tolist()
    assert_close(corrected[0], g["r2_logits_greedy"], what="round-2 greedy corrected logits")
    if name != "dflash":
        assert_close(conf[0], g["r2_conf_logits_greedy"], what="round-2 greedy confidence logits")


def test_both_rounds_in_one_padded_batch(case):
    """Rounds 1 and 2 as two requests of one batch over a cache 3 rows longer than round 2's; unused rows
    hold NaN."""
    _, model, g, fx = case
    n1, n2 = fx.ctx, fx.ctx + fx.new
    rows = n2 + 3
    r1 = context_cache(model, g["ctx_features"], 0)
    r2 = context_cache(model, torch.cat([g["ctx_features"], g["r2_ctx_features_new"]]), 0)
    cache = []
    for (k1, v1), (k2, v2) in zip(r1, r2):
        k, v = torch.full((2, rows, *k1.shape[2:]), torch.nan), torch.full((2, rows, *v1.shape[2:]), torch.nan)
        k[0, :n1], v[0, :n1], k[1, :n2], v[1, :n2] = k1[0], v1[0], k2[0], v2[0]
        cache.append((k, v))
    valid = torch.arange(rows) < torch.tensor([[n1], [n2]])
    block = torch.full((2, GAMMA), model.config.mask_token_id)
    block[:, 0] = torch.cat([g["anchor_id"], g["r2_anchor_id"]])
    pos = torch.tensor([[n1], [n2]]) + torch.arange(GAMMA)
    h = model.block_hidden(block, pos, cache, valid)
    assert_close(h[0], g["h"], what="round-1 h in a padded batch")
    assert_close(h[1], g["r2_h"], what="round-2 h in a padded batch")


def test_training_forward(case):
    name, model, g, fx = case
    anchors, keep = g["train_anchors"][None], g["train_keep"][None]
    out = model.forward_train(g["train_input_ids"][None], g["train_ctx_features"][None], anchors, keep)
    kept = keep[0].bool()
    assert out.draft_logits.shape == (1, 8, GAMMA, model.vocab_size) and out.draft_logits.isfinite().all()
    # Dummy-block rows are don't-care in the fixture.
    assert_close(out.draft_logits[0][kept], g["train_draft_logits"][kept], what="train draft logits")
    assert torch.equal(out.labels[0], g["train_target_ids"])
    assert torch.equal(out.positions[0], g["train_anchors"][:, None] + torch.arange(GAMMA))
    if name == "dflash":
        assert out.confidence_logits is None
    else:
        assert_close(out.confidence_logits[0][kept], g["train_confidence_pred"][kept], what="train confidence")
    eval_mask = build_eval_mask(anchors, keep, g["train_loss_mask"][None], GAMMA)
    assert torch.equal(eval_mask[0].long(), g["train_eval_mask"])
    target = aligned_target_logits(model.base_logits, g["train_target_last_hidden"][None], anchors, keep, GAMMA)
    assert_close(target[0], g["train_aligned_target_logits"], what="aligned target logits")


def test_training_loss_and_metrics(case):
    name, model, g, fx = case
    anchors, keep = g["train_anchors"][None], g["train_keep"][None]
    out = model.forward_train(g["train_input_ids"][None], g["train_ctx_features"][None], anchors, keep)
    target = aligned_target_logits(model.base_logits, g["train_target_last_hidden"][None], anchors, keep, GAMMA)
    config = LossConfig.dflash() if name == "dflash" else LossConfig.dspark()
    result = dspark_loss(out, target, g["train_loss_mask"][None], anchors, keep, config)
    for term, value in result.terms.items():
        assert_close(value.reshape(1), g[f"train_{term}"], what=term)
    assert_close(result.loss.reshape(1), g["train_loss"], what="loss")
    want = {k[len("train_metric:"):]: v for k, v in g.items() if k.startswith("train_metric:")}
    if want:  # the Qwen3 fixture logs DeepSpec's training metrics (DFlash: no l1 / confidence ones); Gemma's none
        assert set(result.metrics) == set(want)
    for metric, value in want.items():
        assert_close(result.metrics[metric].value.reshape(1), value, what=metric)
