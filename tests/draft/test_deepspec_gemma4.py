"""DeepSpec's Gemma-4-layout drafts (`Gemma4DSparkModel`): the fixture's configs (tests/data/
deepspec_gemma4_golden, written by tools/make_deepspec_gemma4_golden.py with DeepSpec's code), the checkpoint
round trip, refusals, and DSpark over a Gemma 4 target end to end. The fixture's outputs (rounds 1 and 2,
the training step) are compared in test_deepspec_golden.py, beside the Qwen3 layout's.

Two cases over tiny random Gemma 4 targets (global_head_dim 20 with partial RoPE 0.25, soft-capped logits,
untied embedding and head): `dspark` (attention_k_eq_v, vanilla Markov head, confidence head) and `dflash`
(separate v_proj, no heads).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dspark.checkpoint import is_deepspec_draft, load_draft, read_draft_config, save
from dspark.checkpoint.deepspec import draft_config_from_dict, draft_config_to_dict
from dspark.config import DraftConfig
from dspark.draft.deepspec import DraftModel

GOLDEN = Path(__file__).resolve().parents[1] / "data" / "deepspec_gemma4_golden"
CASES = ("dspark", "dflash")
GAMMA, V = 5, 160


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
