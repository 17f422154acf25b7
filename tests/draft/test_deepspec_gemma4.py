"""DeepSpec's Gemma-4-layout drafts (`Gemma4DSparkModel`) against DeepSpec's own outputs (tests/data/
deepspec_gemma4_golden, written by tools/make_deepspec_gemma4_golden.py with DeepSpec's code).

Two cases over tiny random Gemma 4 targets (global_head_dim 20 with partial RoPE 0.25, soft-capped logits,
untied embedding and head): `dspark` (attention_k_eq_v, vanilla Markov head, confidence head) and `dflash`
(separate v_proj, no heads). Each is loaded from its DeepSpec checkpoint (bf16, upcast to fp32) and fed the
fixture's inputs: inference round 1 (context rows 0..15, anchor at 16), round 2 through the same context cache
(rows 16..18 appended, anchor at 19), and one training step (8 fixed anchors on a 24-token sequence). Floats
are compared at the fp32 table tolerance, ids, masks and proposal lengths exactly.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dspark import ops
from dspark.checkpoint import is_deepspec_draft, load_draft, read_draft_config, save
from dspark.checkpoint.deepspec import draft_config_from_dict, draft_config_to_dict
from dspark.config import DraftConfig
from dspark.draft.deepspec import DraftModel
from dspark.train.loss import LossConfig, aligned_target_logits, build_eval_mask, dspark_loss
from tests.compare import assert_close
from tests.helpers.deepspec_golden import context_cache, greedy_block, proposal_length

GOLDEN = Path(__file__).resolve().parents[1] / "data" / "deepspec_gemma4_golden"
CASES = ("dspark", "dflash")
GAMMA, CTX, NEW, V = 5, 16, 3, 160


@pytest.fixture(scope="module", params=CASES)
def case(request):
    model = load_draft(GOLDEN / request.param / "checkpoint", dtype=torch.float32)
    return request.param, model, load_file(GOLDEN / request.param / "golden.safetensors")


def test_checkpoint_config(case):
    name, model, _ = case
    cfg = model.config
    assert is_deepspec_draft(GOLDEN / name / "checkpoint")
    assert cfg.kind == "gemma4" and (cfg.block_size, cfg.mask_token_id, cfg.num_target_layers) == (GAMMA, 150, 4)
    assert (cfg.hidden_size, cfg.num_layers, cfg.num_heads, cfg.head_dim, cfg.vocab_size) == (40, 2, 4, 20, V)
    assert (cfg.num_kv_heads, cfg.k_eq_v) == ((1, True) if name == "dspark" else (2, False))
    assert (model.layers[0].self_attn.v_proj is None) == cfg.k_eq_v
    assert (cfg.rope_theta, cfg.rope_fraction, cfg.logit_softcap, cfg.hidden_act) == (1e6, 0.25, 15.0,
                                                                                     "gelu_pytorch_tanh")
    assert (cfg.attention_scale, cfg.embed_scale) == (1.0, 40 ** 0.5) and cfg.value_norm and cfg.sandwich_norms
    # The checkpoint's layer_scalar buffers (random in the fixture) are loaded, not left at 1.
    assert all(layer.layer_scalar.item() != 1.0 for layer in model.layers)
    if name == "dflash":
        assert model.markov_head is None and model.confidence_head is None
    else:
        assert cfg.markov_rank == 8 and cfg.has_confidence_head and cfg.confidence_with_markov


def test_round1(case):
    name, model, g = case
    outs = []
    hooks = [layer.register_forward_hook(lambda mod, args, out: outs.append(out[:, 0])) for layer in model.layers]
    try:
        assert_close(model.project_context(g["ctx_features"]), g["debug_ctx_proj"], what="C")
        assert_close(model.embed(g["block_input_ids"]), g["debug_block_embed"], what="scaled block embedding")
        pos = (g["anchor_pos"] + torch.arange(GAMMA))[None]
        assert torch.equal(torch.cat([torch.arange(CTX), pos[0]]), g["position_ids"])
        h = model.block_hidden(g["block_input_ids"][None], pos, context_cache(model, g["ctx_features"], 0),
                               torch.ones(1, CTX, dtype=torch.bool))[0]
    finally:
        for hook in hooks:
            hook.remove()
    for i, out in enumerate(outs):
        assert_close(out[0], g[f"debug_layer{i}_out"], what=f"layer {i} output")
    assert_close(h, g["h"], what="h")
    U = model.base_logits(h)
    assert U.dtype == torch.float32 and U.abs().max() < 15.0  # soft-capped
    assert_close(U, g["U"], what="U")
    logits_tf = model.corrected_logits_tf(U, g["prev_ids_tf"], h)
    assert_close(logits_tf, g["logits_tf"], what="teacher-forced corrected logits")
    probs = ops.probs(logits_tf, torch.full((GAMMA,), 0.8), torch.zeros(GAMMA, dtype=torch.long), torch.ones(GAMMA))
    assert_close(probs, g["probs_tf_t0p8"], what="softmax(logits_tf / 0.8)")
    conf = model.confidence_logits(h, g["prev_ids_tf"])
    if name == "dflash":
        assert conf is None
    else:
        assert_close(conf, g["conf_logits_tf"], what="teacher-forced confidence logits")
        assert_close(torch.sigmoid(conf), g["conf_probs_tf"], what="teacher-forced confidence")


def test_round1_greedy_block(case):
    name, model, g = case
    tokens, corrected, conf = greedy_block(model, g["U"][None], g["h"][None], g["anchor_id"])
    assert tokens[0].tolist() == g["greedy_tokens"].tolist()
    assert_close(corrected[0], g["logits_greedy"], what="greedy corrected logits")
    if name == "dflash":
        assert conf is None
    else:
        assert_close(conf[0], g["conf_logits_greedy"], what="greedy confidence logits")
    lens = [proposal_length(None if conf is None else conf[0], tau, GAMMA) for tau in g["conf_thresholds"].tolist()]
    assert lens == g["proposal_lens"].tolist()


def test_round2_through_the_context_cache_in_a_padded_batch(case):
    """Round 2 appends K/V for rows 16..18 to the round-1 cache; rounds 1 and 2 run as two requests of one
    batch over a 21-row cache whose unused rows hold NaN."""
    name, model, g = case
    assert torch.equal(torch.arange(CTX, CTX + NEW + GAMMA), g["r2_position_ids"])
    r1 = context_cache(model, g["ctx_features"], 0)
    cache = []
    for (k1, v1), (k2, v2) in zip(r1, context_cache(model, g["r2_ctx_features_new"], CTX)):
        k, v = torch.full((2, 21, *k1.shape[2:]), torch.nan), torch.full((2, 21, *v1.shape[2:]), torch.nan)
        k[0, :CTX], v[0, :CTX] = k1[0], v1[0]
        k[1, :CTX + NEW], v[1, :CTX + NEW] = torch.cat([k1, k2], 1)[0], torch.cat([v1, v2], 1)[0]
        cache.append((k, v))
    valid = torch.arange(21) < torch.tensor([[CTX], [CTX + NEW]])
    anchors = torch.cat([g["anchor_id"], g["r2_anchor_id"]])
    block = torch.full((2, GAMMA), model.config.mask_token_id)
    block[:, 0] = anchors
    h = model.block_hidden(block, torch.cat([g["anchor_pos"], g["r2_anchor_pos"]])[:, None] + torch.arange(GAMMA),
                           cache, valid)
    assert_close(h[0], g["h"], what="round-1 h in a padded batch")
    assert_close(h[1], g["r2_h"], what="round-2 h")
    U = model.base_logits(h)
    assert_close(U[1], g["r2_U"], what="round-2 U")
    tokens, corrected, conf = greedy_block(model, U, h, anchors)
    assert tokens[1].tolist() == g["r2_greedy_tokens"].tolist()
    assert_close(corrected[1], g["r2_logits_greedy"], what="round-2 greedy corrected logits")
    if name != "dflash":
        assert_close(conf[1], g["r2_conf_logits_greedy"], what="round-2 greedy confidence logits")


def test_training_forward_loss(case):
    name, model, g = case
    anchors, keep = g["train_anchors"][None], g["train_keep"][None]
    out = model.forward_train(g["train_input_ids"][None], g["train_ctx_features"][None], anchors, keep)
    kept = keep[0].bool()
    assert out.draft_logits.shape == (1, 8, GAMMA, V) and out.draft_logits.isfinite().all()
    assert_close(out.draft_logits[0][kept], g["train_draft_logits"][kept], what="train draft logits")
    assert torch.equal(out.labels[0], g["train_target_ids"])
    if name == "dflash":
        assert out.confidence_logits is None
    else:
        assert_close(out.confidence_logits[0][kept], g["train_confidence_pred"][kept], what="train confidence")
    eval_mask = build_eval_mask(anchors, keep, g["train_loss_mask"][None], GAMMA)
    assert torch.equal(eval_mask[0].long(), g["train_eval_mask"])
    target = aligned_target_logits(model.base_logits, g["train_target_last_hidden"][None], anchors, keep, GAMMA)
    assert_close(target[0], g["train_aligned_target_logits"], what="aligned (soft-capped) target logits")
    config = LossConfig.dflash() if name == "dflash" else LossConfig.dspark()
    result = dspark_loss(out, target, g["train_loss_mask"][None], anchors, keep, config)
    for term, value in result.terms.items():
        assert_close(value.reshape(1), g[f"train_{term}"], what=term)
    assert_close(result.loss.reshape(1), g["train_loss"], what="loss")


def test_checkpoint_round_trip(tmp_path, case):
    """dspark writes the Gemma layout back (same tensor names, a config DeepSpec's fields describe) and reads
    it to the same model."""
    name, model, g = case
    save(model, tmp_path)
    assert read_draft_config(tmp_path) == model.config
    written = json.loads((tmp_path / "config.json").read_text())
    assert written["architectures"] == ["Gemma4DSparkModel"] and written["model_type"] == "gemma4_text"
    assert set(load_file(tmp_path / "model.safetensors")) == set(
        load_file(GOLDEN / name / "checkpoint" / "model.safetensors"))
    again = load_draft(tmp_path)
    for (k, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), k


def test_random_gemma4_draft_is_a_gemma4_draft():
    model = DraftModel.random(DraftConfig.tiny_gemma4())
    assert all(layer.layer_scalar.item() == 1.0 for layer in model.layers)
    assert draft_config_from_dict(draft_config_to_dict(model.config)) == model.config


@pytest.mark.parametrize("change, message", [
    (dict(model_type="qwen3"), "model_type 'qwen3'"),
    (dict(enable_moe_block=True), "enable_moe_block"),
    (dict(hidden_size_per_layer_input=16), "hidden_size_per_layer_input"),
    (dict(global_head_dim=None), "lacks"),
    (dict(attention_k_eq_v=True, num_global_key_value_heads=None), "num_global_key_value_heads"),
    (dict(rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}), "full_attention"),
    (dict(rope_parameters={"full_attention": {"rope_type": "yarn", "rope_theta": 1e6}}), "'yarn'"),
    (dict(rope_parameters={"full_attention": {"rope_type": "proportional", "rope_theta": 1e6, "factor": 8.0}}),
     "factor"),
    (dict(use_double_wide_mlp=True, num_kv_shared_layers=1), "use_double_wide_mlp"),
    (dict(hidden_activation="relu"), "hidden_act"),
    (dict(architectures=["Gemma4DSparkModel", "Qwen3DSparkModel"]), "not a DeepSpec DSpark/DFlash draft"),
])
def test_config_refusals(change, message):
    d = json.loads((GOLDEN / "dspark" / "checkpoint" / "config.json").read_text())
    with pytest.raises(ValueError, match=message):
        draft_config_from_dict({**d, **change})


def test_a_qwen3_config_cannot_hold_gemma_fields():
    with pytest.raises(ValueError, match="cannot express"):
        draft_config_to_dict(DraftConfig.tiny(logit_softcap=30.0))


def test_dspark_over_a_gemma4_target_equals_greedy(tmp_path):
    """End to end: a Gemma 4 target saved by transformers + a Gemma-layout DSpark draft checkpoint (without its
    embedding and head, which come from the target) → greedy speculative output equals plain greedy."""
    from dspark.checkpoint import load_target, save_deepspec_draft
    from dspark.decode import generate
    from tests.helpers.hf import save_dense_hf

    save_dense_hf("gemma4", tmp_path / "target")
    target = load_target(tmp_path / "target")
    t = target.config
    # The draft the way DeepSpec's build_draft_config derives it from the target's text config.
    cfg = DraftConfig.tiny_gemma4(
        hidden_size=t.hidden_size, target_hidden_size=t.hidden_size, vocab_size=t.vocab_size,
        num_heads=t.num_heads, num_kv_heads=1, head_dim=t.global_head_dim, intermediate_size=t.intermediate_size,
        rope_theta=t.rope.theta, rope_fraction=t.rope.partial_rotary_factor, logit_softcap=t.final_logit_softcapping,
        embed_scale=t.embed_scale, num_target_layers=t.num_layers, target_layer_ids=(0, 1, 2),
        mask_token_id=t.vocab_size - 1)
    save_deepspec_draft(DraftModel.random(cfg, seed=3), tmp_path / "draft", include_shared=False)
    prompts = [[5, 17, 33, 8, 61, 2 + i] for i in range(2)] + [[44, 9, 70]]
    ar = generate(target, prompts, method="ar", max_new_tokens=12)
    spec = generate(target, prompts, method="dspark", draft=tmp_path / "draft", max_new_tokens=12)
    assert [r.token_ids for r in spec] == [r.token_ids for r in ar]
