"""A synthetic -DSpark release (V4 target + DSpark stages under mtp.*, FP8 / FP4 shards, dspark_*
config fields) loads, drafts in the engine, and refuses missing or unexpected stage tensors."""

from __future__ import annotations

import json

import pytest
import torch

from dspark.config import DSparkFields, EngineConfig, ModelConfig, SamplingParams
from dspark.decode import Engine, collect, generate
from dspark.draft.v4 import V4DSparkDraft
from dspark.checkpoint import config_to_dict, load_target as load_model, load_v4_draft as load_dspark_draft
from dspark.checkpoint.v4 import dspark_stage_sources, to_upstream
from dspark.model.target import DeepseekV4
from tests.helpers.checkpoints import FLASH_LEGACY, assert_states_equal, quantise_release, write

DS = DSparkFields(block_size=5, noise_token_id=3, target_layer_ids=(0, 1, 2), markov_rank=8)
CFG = ModelConfig.tiny(hidden_size=136, q_lora_rank=128, num_layers=3, layer_types=("sliding", "csa", "hca"),
                       mlp_layer_types=("hash", "score", "score"), mtp_kind="dspark", num_mtp_layers=3, dspark=DS)
STAGES = 3


def stage_names(name, shape):
    return dspark_stage_sources(name, shape, STAGES)


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    target = DeepseekV4.random(CFG.replace(mtp_kind="none", num_mtp_layers=0), seed=4)
    draft = V4DSparkDraft.random(CFG, STAGES, seed=5)
    up = {**to_upstream(target.state_dict()), **to_upstream(draft.state_dict(), sources=stage_names)}
    stored, expected = quantise_release(up)
    for k in [k for k in up if "markov_head" in k or "confidence_head" in k]:  # released as BF16
        stored.pop(k[:-7] + ".scale", None)
        stored[k] = up[k].bfloat16()
        expected[k] = stored[k].float()
    config = dict(config_to_dict(CFG), quantization_config=FLASH_LEGACY["quantization_config"])
    path = write(tmp_path_factory.mktemp("dspark_release"), stored, config, shards=3)
    return path, stored, expected, config


def test_release_loads_dequantised_and_drafts(release):
    path, stored, expected, _ = release
    assert stored["mtp.0.main_proj.weight"].dtype == torch.float8_e4m3fn
    assert stored["mtp.1.ffn.experts.0.w1.weight"].dtype == torch.int8
    target = load_model(path).eval()
    assert target.config.mtp_kind == "dspark" and target.config.num_mtp_layers == STAGES
    draft = load_dspark_draft(path, target).eval()
    got = to_upstream(draft.state_dict(), sources=stage_names)
    assert_states_equal(got, {k: v for k, v in expected.items() if k.startswith("mtp.")})

    prompts = [[5, 6, 7, 8], list(range(40, 61))]
    ar = generate(target, prompts, max_new_tokens=12, max_seq_len=64)
    engine = Engine(target, "dspark-v4", draft, EngineConfig(max_batch=2, max_seq_len=64))
    assert engine.drafter.num_draft_tokens == DS.block_size and engine.drafter.capacity == CFG.sliding_window
    spec = collect(engine, prompts, [SamplingParams(max_tokens=12)] * 2)
    assert [r.token_ids for r in spec] == [r.token_ids for r in ar]
    assert all(r.stats.rounds > 0 and r.stats.proposal_lens[0] == DS.block_size for r in spec)


@pytest.mark.parametrize("drop,add,message", [
    (("mtp.1.attn.wkv.weight", "mtp.1.attn.wkv.scale"), {}, "missing tensors: mtp.1.attn.wkv.weight"),
    (("mtp.2.markov_head.markov_w1.weight",), {}, "missing tensors: mtp.2.markov_head.markov_w1.weight"),
    (("mtp.1.ffn.shared_experts.w2.weight", "mtp.1.ffn.shared_experts.w2.scale"), {},
     "missing tensors: mtp.1.ffn.shared_experts.w2.weight"),
    ((), {"mtp.1.attn.extra_proj.weight": torch.zeros(2, 2)}, "unexpected tensors: mtp.1.attn.extra_proj.weight"),
    ((), {"mtp.0.confidence_head.proj.bias": torch.zeros(1)}, "unexpected tensors: mtp.0.confidence_head.proj.bias"),
])
def test_stage_tensors_are_checked_by_name(tmp_path, release, drop, add, message):
    _, stored, _, config = release
    tensors = {k: v for k, v in stored.items() if k not in drop}
    tensors.update(add)
    path = write(tmp_path, tensors, config)
    with pytest.raises(ValueError, match=message):
        load_dspark_draft(path)


def test_plain_checkpoint_has_no_draft(tmp_path):
    model = DeepseekV4.random(ModelConfig.tiny(), seed=0)
    path = write(tmp_path, to_upstream(model.state_dict()), json.loads(json.dumps(config_to_dict(model.config))))
    with pytest.raises(ValueError, match="no DSpark stages"):
        load_dspark_draft(path)
