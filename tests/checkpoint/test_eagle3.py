"""DeepSpec EAGLE-3 checkpoints, Qwen3 and Gemma 4 layouts: `load_draft` tells them apart by config.json
and loads them strictly, `save` writes them back; drafts that do not fit the target, configs the layout
cannot run (several layers, MoE blocks, other RoPE), draft-vocabulary maps and broken checkpoints are
refused by name."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from dspark import checkpoint
from dspark.checkpoint.eagle3 import eagle3_config_from_dict, load_eagle3_draft
from dspark.checkpoint.reader import CheckpointReader
from dspark.draft.eagle3 import Eagle3Draft
from tests.helpers.drafters import dspark_target as target
from tests.helpers.eagle3 import GOLDEN, save_eagle3_checkpoint, tiny_eagle3_draft


def golden_config() -> dict:
    return json.loads((GOLDEN / "checkpoint" / "config.json").read_text())


def test_load_draft_detects_the_layout_and_loads_exactly(tmp_path):
    draft = tiny_eagle3_draft(target())
    loaded = checkpoint.load_draft(save_eagle3_checkpoint(draft, tmp_path / "d"), target())
    assert isinstance(loaded, Eagle3Draft) and loaded.config == draft.config
    for name, t in draft.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], t), name
    golden = checkpoint.load_draft(GOLDEN / "checkpoint")  # bf16 on disk, fp32 here
    assert isinstance(golden, Eagle3Draft) and golden.fc.weight.dtype == torch.float32


def test_embedding_and_head_come_from_the_target_when_left_out(tmp_path):
    draft = tiny_eagle3_draft(target())
    path = save_eagle3_checkpoint(draft, tmp_path / "d", drop=("embed_tokens.weight", "lm_head.weight"))
    loaded = checkpoint.load_draft(path, target())
    assert torch.equal(loaded.embed_tokens.weight, target().model.embed_tokens.weight)
    assert torch.equal(loaded.lm_head.weight, target().lm_head.weight)
    assert torch.equal(loaded.fc.weight, draft.fc.weight)
    with pytest.raises(ValueError, match="2 missing tensors: embed_tokens.weight, lm_head.weight"):
        load_eagle3_draft(path)  # no target to take them from


@pytest.mark.parametrize("changes,match", [
    (dict(hidden_size=64), r"width 64 per tap; the target's hidden_size is 56"),
    (dict(vocab_size=512), r"vocabulary \(512\) is not the target's \(509\)"),
])
def test_a_draft_for_another_target_is_refused_naming_both(tmp_path, changes, match):
    cfg = target().config
    other = type("Cfg", (), {**dict(hidden_size=cfg.hidden_size, vocab_size=cfg.vocab_size,
                                    num_layers=cfg.num_layers), **changes})
    draft = tiny_eagle3_draft(type("T", (), dict(config=other))(), favour=None)
    with pytest.raises(ValueError, match=match):
        checkpoint.load_draft(save_eagle3_checkpoint(draft, tmp_path / "d"), target())


def test_taps_beyond_the_targets_depth_are_refused(tmp_path):
    deep = type("Cfg", (), dict(hidden_size=56, vocab_size=509, num_layers=8))
    draft = tiny_eagle3_draft(type("T", (), dict(config=deep))(), taps=(2, 5), favour=None)
    with pytest.raises(ValueError, match=r"taps target layers \[2, 5\]; the target has 4 layers"):
        checkpoint.load_draft(save_eagle3_checkpoint(draft, tmp_path / "d"), target())


@pytest.mark.parametrize("changes,match", [
    (dict(architectures=["Gemma4Eagle3Model"]), r"model_type 'qwen3': a Gemma4Eagle3Model config has model_type"),
    (dict(architectures=["Qwen3Eagle3Model", "Gemma4Eagle3Model"]), "is not a DeepSpec EAGLE-3 draft"),
    (dict(num_hidden_layers=2, draft_num_hidden_layers=2), "only single-layer EAGLE-3 drafts"),
    (dict(hidden_act="gelu"), "hidden_act = 'gelu'"),
    (dict(attention_bias=True), "attention_bias = True"),
    (dict(rope_parameters={"rope_type": "yarn", "factor": 4.0}), "rope_type 'yarn'"),
    (dict(ttt_length=None), r"config lacks \['ttt_length'\]"),
    (dict(target_layer_ids=[0, 3]), r"target_layer_ids \(0, 3\) must lie in \[0, 3\)"),
])
def test_other_layouts_and_bad_configs_are_refused(changes, match):
    with pytest.raises(ValueError, match=match):
        eagle3_config_from_dict({**golden_config(), **changes})


def test_broken_checkpoints_are_refused_by_tensor_name(tmp_path):
    draft = tiny_eagle3_draft(target())
    maps = dict(d2t=torch.zeros(509, dtype=torch.long), t2d=torch.zeros(509, dtype=torch.bool))
    with pytest.raises(ValueError, match="2 unexpected tensors: d2t, t2d"):
        checkpoint.load_draft(save_eagle3_checkpoint(draft, tmp_path / "maps", extra=maps), target())
    with pytest.raises(ValueError, match=r"1 missing tensors: fc.weight"):
        checkpoint.load_draft(save_eagle3_checkpoint(draft, tmp_path / "fc", drop=("fc.weight",)), target())
    bad = {"layers.0.mlp.up_proj.weight": torch.zeros(3, 3)}
    with pytest.raises(ValueError, match=r"mis-shaped tensors: layers.0.mlp.up_proj.weight \[3, 3\]"):
        checkpoint.load_draft(save_eagle3_checkpoint(draft, tmp_path / "shape", drop=tuple(bad), extra=bad), target())


# ------------------------------------------------------------------ Gemma 4 layout (Gemma4Eagle3Model)
GEMMA4 = GOLDEN / "gemma4" / "checkpoint"


def gemma4_config() -> dict:
    return json.loads((GEMMA4 / "config.json").read_text())


def test_save_round_trips_both_layouts(tmp_path):
    """`checkpoint.save` writes DeepSpec's config and tensor names; `load_draft` reads back the same draft."""
    for name, draft in (("qwen3", tiny_eagle3_draft(target())), ("gemma4", load_eagle3_draft(GEMMA4))):
        checkpoint.save(draft, tmp_path / name)
        loaded = checkpoint.load_draft(tmp_path / name)
        assert isinstance(loaded, Eagle3Draft) and loaded.config == draft.config, name
        assert loaded.state_dict().keys() == draft.state_dict().keys(), name
        for key, t in draft.state_dict().items():
            assert torch.equal(loaded.state_dict()[key], t), f"{name}: {key}"
    # DeepSpec's own Gemma 4 config and ours describe the same draft, and name the same tensors.
    assert eagle3_config_from_dict(gemma4_config()) == eagle3_config_from_dict(
        json.loads((tmp_path / "gemma4" / "config.json").read_text()))
    with CheckpointReader(GEMMA4) as theirs, CheckpointReader(tmp_path / "gemma4") as ours:
        assert sorted(theirs.keys()) == sorted(ours.keys())


def test_gemma4_values_from_v_proj_when_k_is_not_v():
    """attention_k_eq_v false: values from v_proj over num_key_value_heads heads (still v-normed)."""
    cfg = eagle3_config_from_dict({**gemma4_config(), "attention_k_eq_v": False})
    assert (cfg.k_eq_v, cfg.value_norm, cfg.num_kv_heads) == (False, True, 2)
    draft = Eagle3Draft.random(cfg)
    assert draft.layers[0].self_attn.v_proj.weight.shape == (2 * 20, 80)
    with torch.no_grad():
        k, v = draft.context_rows(torch.randn(3, 40), torch.tensor([1, 2, 3]), torch.arange(3))
    assert k.shape == v.shape == (3, 2, 20) and not torch.equal(k, v)


@pytest.mark.parametrize("changes,match", [
    (dict(model_type="qwen3"), r"model_type 'qwen3': a Gemma4Eagle3Model config has model_type"),
    (dict(num_hidden_layers=2, draft_num_hidden_layers=2), "only single-layer EAGLE-3 drafts"),
    (dict(enable_moe_block=True), "enable_moe_block = True"),
    (dict(hidden_size_per_layer_input=8), "hidden_size_per_layer_input = 8"),
    (dict(rope_parameters={"full_attention": {"rope_type": "yarn", "rope_theta": 1e6}}), "rope_type 'yarn'"),
    (dict(global_head_dim=None), r"config lacks \['global_head_dim'\]"),
    (dict(num_global_key_value_heads=None), "config lacks 'num_global_key_value_heads'"),
])
def test_gemma4_configs_it_cannot_run_are_refused(changes, match):
    with pytest.raises(ValueError, match=match):
        eagle3_config_from_dict({**gemma4_config(), **changes})


def test_a_config_the_layout_cannot_express_is_not_saved(tmp_path):
    draft = tiny_eagle3_draft(target())
    odd = Eagle3Draft.random(dataclasses.replace(draft.config, logit_softcap=30.0))
    with pytest.raises(ValueError, match=r"Qwen3Eagle3Model config cannot express \{'logit_softcap': 30.0\}"):
        checkpoint.save(odd, tmp_path / "d")
