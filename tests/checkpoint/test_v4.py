"""Config translation, tensor names, checkpoint reading, strict loading and saving (dspark.checkpoint.v4)."""

from __future__ import annotations

import json
import os
import re
import warnings
from pathlib import Path

import pytest
import torch

from dspark.config import DSparkFields, ModelConfig, RopeConfig
from dspark.model.layers import rope_inv_freq
from dspark.checkpoint import CheckpointReader, config_from_dict, config_to_dict, read_config, read_mtp_state
from dspark.checkpoint import load_target as load_model, save_target as save_pretrained
from dspark.checkpoint.v4 import detect_layout, detect_mtp, load_weights, to_upstream, upstream_sources
from dspark.checkpoint.quant import dequantize_fp4, dequantize_fp8, quantize_fp4, quantize_fp8
from dspark.model.cache import TargetCache
from dspark.model.target import DeepseekV4
from tests.compare import assert_close
from tests.helpers.checkpoints import FLASH_LEGACY, assert_states_equal, quantise_release, write

transformers = pytest.importorskip("transformers")
from transformers.models.deepseek_v4.modeling_deepseek_v4 import DeepseekV4RotaryEmbedding  # noqa: E402

TINY = ModelConfig.tiny()
DSPARK = DSparkFields(block_size=5, noise_token_id=3, target_layer_ids=(1, 2, 3), markov_rank=8)


def hf_config(d: dict):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return transformers.DeepseekV4Config(**d)


def hf_model(cfg: ModelConfig):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return transformers.DeepseekV4ForCausalLM(hf_config(config_to_dict(cfg)))


@torch.no_grad()
def randomise(model: torch.nn.Module, seed: int = 0) -> dict[str, torch.Tensor]:
    """Every parameter and persistent buffer non-trivial (HF's init leaves many at 0); tid2eid holds
    K distinct experts per token. Returns a copy of the state dict."""
    gen = torch.Generator().manual_seed(seed)
    for name, t in model.state_dict().items():
        if name.endswith("tid2eid"):
            t.copy_(torch.rand(t.shape[0], TINY.n_routed_experts, generator=gen).argsort(-1)[:, : t.shape[1]])
        else:
            t.copy_(torch.randn(t.shape, generator=gen))
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def hf_state() -> dict[str, torch.Tensor]:
    """HF DeepseekV4ForCausalLM(tiny), fully randomised: the independent source of names and shapes."""
    return randomise(hf_model(TINY))


@pytest.fixture(scope="module")
def upstream(hf_state) -> dict[str, torch.Tensor]:
    return to_upstream(hf_state)


# ============================================================================ config translation
def test_defaults_are_hf_defaults():
    ours = config_from_dict({})
    assert ours == config_from_dict(hf_config({}).to_dict())
    assert ours.layer_types[:5] == ("hca", "hca", "hca", "csa", "hca") and ours.layer_types[-1] == "hca"
    assert ours.mlp_layer_types[:4] == ("hash", "hash", "hash", "score")
    assert ours.rope_head_dim == 64 and (ours.csa_rate, ours.hca_rate) == (4, 128)
    assert ours.main_rope == RopeConfig(theta=10000.0) and ours.compress_rope == RopeConfig(theta=160000.0)
    assert (ours.mtp_kind, ours.num_mtp_layers, ours.eos_token_ids, ours.bos_token_id) == ("mtp", 1, (1,), 0)


def test_legacy_flash_config():
    ours = config_from_dict(FLASH_LEGACY)
    assert ours == ModelConfig.flash()  # 44 compress_ratios truncated to 43 layers, layer 42 CSA
    assert ours == config_from_dict(hf_config(dict(FLASH_LEGACY)).to_dict())
    extra = dict(ours.extra)
    assert json.loads(extra["quantization_config"])["weight_block_size"] == [128, 128]
    assert json.loads(extra["topk_method"]) == "noaux_tc" and "compress_ratios" not in extra
    assert config_to_dict(ours)["quantization_config"] == FLASH_LEGACY["quantization_config"]


def test_legacy_compress_rate_overrides_and_truncation():
    d = {"num_hidden_layers": 3, "compress_ratios": [4, 128, 0, 4, 4], "compress_rate_hca": 16,
         "compress_rates": {"compressed_sparse_attention": 8}, "num_hash_layers": 1}
    ours = config_from_dict(d)
    assert ours.layer_types == ("csa", "hca", "sliding") and (ours.csa_rate, ours.hca_rate) == (8, 16)
    assert ours.mlp_layer_types == ("hash", "score", "score")
    hf = hf_config(dict(d, compress_rates={"compressed_sparse_attention": 8, "heavily_compressed_attention": 128}))
    assert hf.compress_rates == {"compressed_sparse_attention": 8, "heavily_compressed_attention": 16}


def test_nested_rope_without_attention_factor_uses_hf_mscale():
    d = {"num_hidden_layers": 2, "head_dim": 64, "partial_rotary_factor": 0.25, "rope_theta": 5000,
         "rope_parameters": {"main": {"rope_type": "default"},
                             "compress": {"rope_type": "yarn", "rope_theta": 20000.0, "factor": 4.0,
                                          "original_max_position_embeddings": 256}}}
    ours = config_from_dict(d)
    rotary = DeepseekV4RotaryEmbedding(hf_config(json.loads(json.dumps(d))))
    assert ours.main_rope.theta == 5000.0  # nested dicts take the top-level rope_theta
    assert ours.compress_rope.attention_factor == pytest.approx(rotary.compress_attention_scaling, rel=1e-12)
    assert ours.compress_rope.attention_factor != 1.0
    assert_close(rope_inv_freq(ours.compress_rope, ours.rope_head_dim), rotary.compress_inv_freq)


ROUND_TRIP = {
    "tiny": TINY,
    "no-mtp": TINY.replace(mtp_kind="none", num_mtp_layers=0),
    "dspark": TINY.replace(mtp_kind="dspark", num_mtp_layers=3, dspark=DSPARK),
    "dspark-fields-only": TINY.replace(mtp_kind="none", num_mtp_layers=0, dspark=DSPARK),
    "flash": ModelConfig.flash(),
    "odd": TINY.replace(head_dim=44, rope_head_dim=30, index_head_dim=32, eos_token_ids=(1, 7), bos_token_id=None,
                        scoring_func="sigmoid", tie_word_embeddings=True,
                        main_rope=RopeConfig(theta=5000.0, kind="yarn", factor=2.0, original_max_position=32,
                                             beta_fast=16.0, beta_slow=2.0, attention_factor=1.25),
                        compress_rope=RopeConfig(theta=7000.0)),
}


@pytest.mark.parametrize("name", list(ROUND_TRIP))
def test_config_round_trip_and_hf_equivalence(name):
    cfg = ROUND_TRIP[name]
    d = config_to_dict(cfg)
    assert config_from_dict(d) == cfg
    assert config_from_dict(json.loads(json.dumps(d))) == cfg  # survives JSON
    hf = hf_config(json.loads(json.dumps(d)))
    assert config_from_dict(hf.to_dict()) == cfg
    # HF's own reading of the dict, checked field by field against ours
    assert hf.qk_rope_head_dim == cfg.rope_head_dim
    assert hf.layer_types == [{"sliding": "sliding_attention", "csa": "compressed_sparse_attention",
                               "hca": "heavily_compressed_attention"}[t] for t in cfg.layer_types]
    assert hf.mlp_layer_types == [{"hash": "hash_moe", "score": "moe"}[t] for t in cfg.mlp_layer_types]
    assert hf.compress_rates == {"compressed_sparse_attention": cfg.csa_rate,
                                 "heavily_compressed_attention": cfg.hca_rate}
    for field in ("vocab_size", "hidden_size", "q_lora_rank", "o_groups", "o_lora_rank", "sliding_window",
                  "index_n_heads", "index_head_dim", "index_topk", "hc_mult", "hc_sinkhorn_iters", "hc_eps",
                  "rms_norm_eps", "n_routed_experts", "num_experts_per_tok", "moe_intermediate_size",
                  "scoring_func", "routed_scaling_factor", "swiglu_limit", "max_position_embeddings",
                  "tie_word_embeddings", "bos_token_id"):
        assert getattr(hf, field) == getattr(cfg, field), field
    rotary = DeepseekV4RotaryEmbedding(hf)
    for table, rope in (("main", cfg.main_rope), ("compress", cfg.compress_rope)):
        assert_close(rope_inv_freq(rope, cfg.rope_head_dim), getattr(rotary, f"{table}_inv_freq"), what=table)
        assert getattr(rotary, f"{table}_attention_scaling") == rope.attention_factor


def test_eos_forms():
    assert config_from_dict({"eos_token_id": [1, 2]}).eos_token_ids == (1, 2)
    assert config_from_dict({"eos_token_id": 5}).eos_token_ids == (5,)
    assert config_from_dict({"eos_token_id": None}).eos_token_ids == ()


def test_dspark_fields():
    d = dict(config_to_dict(TINY), dspark_block_size=5, dspark_noise_token_id=3, dspark_target_layer_ids=[1, 2, 3],
             dspark_markov_rank=8)
    cfg = config_from_dict(d)
    # the root config of -DSpark releases says num_nextn_predict_layers = 1: one stage per tap instead
    assert (cfg.mtp_kind, cfg.num_mtp_layers, cfg.dspark) == ("dspark", 3, DSPARK)


@pytest.mark.parametrize("change, message", [
    ({"layer_types": ["sliding_attention", "global_attention", "sliding_attention", "sliding_attention"]},
     r"layer_types has unknown values \['global_attention'\]"),
    ({"layer_types": None, "compress_ratios": [0, 4, 5, 128]}, r"compress_ratios\[2\] = 5"),
    ({"layer_types": ["sliding_attention"]}, "layer_types has 1 entries for num_hidden_layers = 4"),
    ({"mlp_layer_types": ["hash_moe", "dense", "moe", "moe"]}, r"mlp_layer_types has unknown values \['dense'\]"),
    ({"scoring_func": "softmax"}, "scoring_func 'softmax'"),
    ({"rope_parameters": {"rope_type": "linear", "factor": 2.0}}, "rope_type 'linear'"),
    ({"rope_parameters": None, "rope_scaling": {"type": "llama3", "factor": 2.0}}, "rope_type 'llama3'"),
    ({"rope_parameters": {"main": {"rope_type": "default"}}}, "both a 'main' and a 'compress'"),
    ({"model_type": "deepseek_v3"}, "model_type 'deepseek_v3'"),
    ({"compress_rates": {"compressed_sparse_attention": 4, "sparse": 8}}, r"compress_rates has unknown .*'sparse'"),
    ({"hidden_act": "gelu"}, "hidden_act = 'gelu'"),
    ({"dspark_block_size": 5}, "lacks .*dspark_noise_token_id"),
    ({"eos_token_id": "eos"}, "eos_token_id"),
])
def test_bad_config_refused(change, message):
    d = dict(config_to_dict(TINY), **change)
    with pytest.raises(ValueError, match=message):
        config_from_dict(d)


def test_read_config_names_the_file(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(dict(config_to_dict(TINY), scoring_func="softmax")))
    with pytest.raises(ValueError, match=re.escape(str(tmp_path / "config.json"))):
        read_config(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        read_config(tmp_path)
    with pytest.raises(FileNotFoundError, match="config.json"):
        read_config(tmp_path / "missing")


# ============================================================================ tensor names
def test_upstream_names_spot_check(hf_state, upstream):
    """Hand-written pairs from deepseek_v4.md §13.2, so the mapping is not only tested against itself."""
    pairs = {
        "embed.weight": "model.embed_tokens.weight", "head.weight": "lm_head.weight",
        "norm.weight": "model.norm.weight", "hc_head_fn": "model.hc_head.hc_fn",
        "hc_head_scale": "model.hc_head.hc_scale",
        "layers.0.attn_norm.weight": "model.layers.0.input_layernorm.weight",
        "layers.3.ffn_norm.weight": "model.layers.3.post_attention_layernorm.weight",
        "layers.2.hc_attn_fn": "model.layers.2.attn_hc.fn", "layers.3.hc_ffn_scale": "model.layers.3.ffn_hc.scale",
        "layers.0.attn.attn_sink": "model.layers.0.self_attn.sinks",
        "layers.1.attn.wq_a.weight": "model.layers.1.self_attn.q_a_proj.weight",
        "layers.1.attn.q_norm.weight": "model.layers.1.self_attn.q_a_norm.weight",
        "layers.1.attn.wq_b.weight": "model.layers.1.self_attn.q_b_proj.weight",
        "layers.0.attn.wkv.weight": "model.layers.0.self_attn.kv_proj.weight",
        "layers.0.attn.kv_norm.weight": "model.layers.0.self_attn.kv_norm.weight",
        "layers.2.attn.wo_a.weight": "model.layers.2.self_attn.o_a_proj.weight",
        "layers.2.attn.wo_b.weight": "model.layers.2.self_attn.o_b_proj.weight",
        "layers.2.attn.compressor.wkv.weight": "model.layers.2.self_attn.compressor.kv_proj.weight",
        "layers.2.attn.compressor.wgate.weight": "model.layers.2.self_attn.compressor.gate_proj.weight",
        "layers.2.attn.compressor.ape": "model.layers.2.self_attn.compressor.position_bias",
        "layers.1.attn.compressor.norm.weight": "model.layers.1.self_attn.compressor.kv_norm.weight",
        "layers.1.attn.indexer.wq_b.weight": "model.layers.1.self_attn.compressor.indexer.q_b_proj.weight",
        "layers.3.attn.indexer.weights_proj.weight":
            "model.layers.3.self_attn.compressor.indexer.scorer.weights_proj.weight",
        "layers.1.attn.indexer.compressor.wkv.weight": "model.layers.1.self_attn.compressor.indexer.kv_proj.weight",
        "layers.1.attn.indexer.compressor.ape": "model.layers.1.self_attn.compressor.indexer.position_bias",
        "layers.3.attn.indexer.compressor.norm.weight": "model.layers.3.self_attn.compressor.indexer.kv_norm.weight",
        "layers.0.ffn.gate.weight": "model.layers.0.mlp.gate.weight",
        "layers.2.ffn.gate.bias": "model.layers.2.mlp.gate.e_score_correction_bias",
        "layers.1.ffn.shared_experts.w1.weight": "model.layers.1.mlp.shared_experts.gate_proj.weight",
        "layers.1.ffn.shared_experts.w3.weight": "model.layers.1.mlp.shared_experts.up_proj.weight",
        "layers.1.ffn.shared_experts.w2.weight": "model.layers.1.mlp.shared_experts.down_proj.weight",
    }
    for up, hf in pairs.items():
        assert torch.equal(upstream[up], hf_state[hf]), up
    i = TINY.moe_intermediate_size
    gate_up = hf_state["model.layers.2.mlp.experts.gate_up_proj"]
    down = hf_state["model.layers.2.mlp.experts.down_proj"]
    assert torch.equal(upstream["layers.2.ffn.experts.5.w1.weight"], gate_up[5, :i])
    assert torch.equal(upstream["layers.2.ffn.experts.5.w3.weight"], gate_up[5, i:])
    assert torch.equal(upstream["layers.2.ffn.experts.5.w2.weight"], down[5])
    tid2eid = upstream["layers.0.ffn.gate.tid2eid"]
    assert tid2eid.dtype == torch.int32 and torch.equal(tid2eid.long(), hf_state["model.layers.0.mlp.gate.tid2eid"])
    experts = 3 * TINY.n_routed_experts * TINY.num_layers
    assert len(upstream) == len(hf_state) - 2 * TINY.num_layers + experts
    assert not any(k.startswith("model.") or "self_attn" in k or "mlp." in k for k in upstream)


def test_upstream_names_agree_with_hf_conversion(tmp_path, hf_state, upstream):
    """HF's own upstream→HF conversion (conversion_mapping["deepseek_v4"]) rebuilds the same state."""
    path = write(tmp_path, upstream, config_to_dict(TINY))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = transformers.DeepseekV4ForCausalLM.from_pretrained(path, dtype=torch.float32)
    assert_states_equal(hf.state_dict(), hf_state)


def test_name_rules_are_exact():
    with pytest.raises(ValueError, match="no upstream name"):
        upstream_sources("model.layers.0.mlp.markov_w1.weight", (4, 4))
    with pytest.raises(ValueError, match="no upstream name"):
        upstream_sources("model.layers.0.enorm.weight", (4,))  # MTP-only names exist only under mtp.*
    assert upstream_sources("mtp.0.norm.weight", (4,))[0].key == "mtp.0.norm.weight"
    assert upstream_sources("mtp.1.hc_head.hc_fn", (4, 16))[0].key == "mtp.1.hc_head_fn"
    assert [s.key for s in upstream_sources("mtp.0.mlp.experts.down_proj", (2, 4, 3))] == [
        "mtp.0.ffn.experts.0.w2.weight", "mtp.0.ffn.experts.1.w2.weight"]


def test_detect_layout():
    assert detect_layout(["model.norm.weight", "lm_head.weight", "mtp.0.enorm.weight"]) == "hf"
    assert detect_layout(["layers.0.attn_norm.weight", "embed.weight", "mtp.0.enorm.weight"]) == "upstream"
    with pytest.raises(ValueError, match="mixes HF names"):
        detect_layout(["model.norm.weight", "layers.0.attn_norm.weight"])
    with pytest.raises(ValueError, match="no DeepSeek-V4 tensor names"):
        detect_layout(["foo.weight"])


def test_detect_mtp():
    raw = config_to_dict(TINY)
    dspark_raw = dict(raw, dspark_block_size=5, dspark_noise_token_id=3, dspark_target_layer_ids=[1, 2, 3],
                      dspark_markov_rank=8)
    assert detect_mtp(["embed.weight"], raw) == ("none", 0)
    assert detect_mtp(["mtp.0.e_proj.weight", "mtp.0.attn.wq_a.weight"], raw) == ("mtp", 1)
    stages = ["mtp.0.main_proj.weight", "mtp.1.attn.wq_a.weight", "mtp.2.markov_head.markov_w1.weight"]
    assert detect_mtp(stages, dspark_raw) == ("dspark", 3)
    with pytest.raises(ValueError, match="lacks .*dspark_block_size"):
        detect_mtp(stages, raw)
    with pytest.raises(ValueError, match="unrecognised mtp"):
        detect_mtp(["mtp.0.attn.wq_a.weight"], raw)
    with pytest.raises(ValueError, match="not numbered"):
        detect_mtp(["mtp.0.e_proj.weight", "mtp.2.e_proj.weight"], raw)


# ============================================================================ loading
def test_load_hf_layout(tmp_path, hf_state):
    model = load_model(write(tmp_path, hf_state, config_to_dict(TINY)))
    # no mtp.* tensors → no MTP module, whatever num_nextn_predict_layers said
    assert model.config == TINY.replace(mtp_kind="none", num_mtp_layers=0)
    assert_states_equal(model.state_dict(), hf_state)


def test_load_upstream_layout(tmp_path, hf_state, upstream):
    model = load_model(write(tmp_path, upstream, config_to_dict(TINY)))
    assert_states_equal(model.state_dict(), hf_state)


def test_load_bf16_keeps_fp32_islands(tmp_path, hf_state, upstream):
    model = load_model(write(tmp_path, upstream, config_to_dict(TINY)), dtype=torch.bfloat16)
    state = model.state_dict()
    for name in ("model.layers.0.attn_hc.fn", "model.layers.1.self_attn.sinks", "model.hc_head.hc_base",
                 "model.layers.1.self_attn.compressor.position_bias", "model.layers.2.mlp.gate.e_score_correction_bias",
                 "model.norm.weight", "model.layers.0.self_attn.q_a_norm.weight"):
        assert state[name].dtype == torch.float32 and torch.equal(state[name], hf_state[name]), name
    assert state["lm_head.weight"].dtype == torch.bfloat16
    assert torch.equal(state["lm_head.weight"], hf_state["lm_head.weight"].bfloat16())
    assert state["model.layers.0.mlp.gate.tid2eid"].dtype == torch.int64


@pytest.fixture(scope="module")
def mtp_model() -> DeepseekV4:
    return DeepseekV4.random(TINY, seed=1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_save_load_round_trip_with_mtp(tmp_path, mtp_model, dtype):
    model = DeepseekV4.random(TINY, seed=1, dtype=dtype) if dtype != torch.float32 else mtp_model
    save_pretrained(model, tmp_path)
    with CheckpointReader(tmp_path) as reader:
        keys = set(reader.keys())
    for key in ("mtp.0.e_proj.weight", "mtp.0.enorm.weight", "mtp.0.attn.wq_a.weight", "mtp.0.hc_attn_fn",
                "mtp.0.attn_norm.weight", "mtp.0.ffn.experts.3.w1.weight", "mtp.0.ffn.gate.bias", "mtp.0.hc_head_fn",
                "mtp.0.norm.weight", "layers.0.ffn.gate.tid2eid", "embed.weight"):
        assert key in keys, key
    loaded = load_model(tmp_path, dtype=dtype)
    assert loaded.config == model.config and loaded.has_mtp
    assert_states_equal(loaded.state_dict(), model.state_dict())


def test_load_hf_layout_with_mtp(tmp_path, mtp_model):
    loaded = load_model(write(tmp_path, mtp_model.state_dict(), config_to_dict(TINY)))
    assert loaded.config.mtp_kind == "mtp"
    assert_states_equal(loaded.state_dict(), mtp_model.state_dict())


def test_truncated_load_skips_deeper_layers_and_mtp(tmp_path, mtp_model):
    save_pretrained(mtp_model, tmp_path)
    loaded = load_model(tmp_path, num_layers=2)
    assert loaded.config == TINY.truncated(2).replace(mtp_kind="none", num_mtp_layers=0)
    full = mtp_model.state_dict()
    expected = {k: v for k, v in full.items()
                if not k.startswith(("model.layers.2.", "model.layers.3.", "mtp."))}
    assert_states_equal(loaded.state_dict(), expected)


def test_load_weights_into_hf_model(tmp_path, hf_state, upstream):
    """The same strict loader fills HF's module (mtp.* skipped, as HF drops it)."""
    hf = hf_model(TINY)
    extra = {"mtp.0.e_proj.weight": torch.ones(TINY.hidden_size, TINY.hidden_size)}
    load_weights(hf, write(tmp_path, {**upstream, **extra}, config_to_dict(TINY)), load_mtp=False)
    assert_states_equal(hf.state_dict(), hf_state)


# ---------------------------------------------------------------------------- FP8 / FP4 release
FP8_CFG = ModelConfig.tiny(hidden_size=136, q_lora_rank=128, num_layers=3, layer_types=("sliding", "csa", "hca"),
                           mlp_layer_types=("hash", "score", "score"))


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    model = DeepseekV4.random(FP8_CFG, seed=2)
    stored, expected = quantise_release(to_upstream(model.state_dict()))
    path = write(tmp_path_factory.mktemp("release"), stored,
                 dict(config_to_dict(FP8_CFG), quantization_config=FLASH_LEGACY["quantization_config"]), shards=3)
    return path, stored, expected, model


def test_sharded_fp8_fp4_release_loads_dequantised(release):
    path, stored, expected, original = release
    assert stored["layers.0.attn.wq_a.weight"].dtype == torch.float8_e4m3fn
    assert stored["layers.0.attn.wq_a.scale"].shape == (1, 2)  # [128, 136]: 136 is not a multiple of 128
    assert stored["layers.0.ffn.experts.0.w1.weight"].dtype == torch.int8
    assert stored["layers.1.attn.compressor.wkv.weight"].dtype == torch.bfloat16
    index = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
    assert index["layers.0.attn.wq_a.weight"] != index["layers.0.attn.wq_a.scale"]  # scale in another shard

    model = load_model(path)
    assert model.config == FP8_CFG
    assert_states_equal(to_upstream(model.state_dict()), expected)
    # and the dequantised weights are the original ones up to FP8 / FP4 rounding
    w = original.state_dict()["model.layers.0.self_attn.q_a_proj.weight"]
    assert_close(model.state_dict()["model.layers.0.self_attn.q_a_proj.weight"], w, rtol=2 ** -4,
                 atol=float(w.abs().max()) * 2 ** -9, what="FP8 weight vs original (3 mantissa bits)")


def test_fp8_block_size_from_quantization_config(tmp_path, upstream):
    stored = dict(upstream)
    w = upstream["layers.0.attn.wq_b.weight"]
    stored["layers.0.attn.wq_b.weight"], stored["layers.0.attn.wq_b.scale"] = quantize_fp8(w, block=(32, 32))
    config = dict(config_to_dict(TINY), quantization_config={"weight_block_size": [32, 32]})
    model = load_model(write(tmp_path, stored, config))
    expected = dequantize_fp8(stored["layers.0.attn.wq_b.weight"], stored["layers.0.attn.wq_b.scale"], (32, 32))
    assert torch.equal(model.state_dict()["model.layers.0.self_attn.q_b_proj.weight"], expected)


def test_save_drops_quantization_config(tmp_path, release):
    model = load_model(release[0])
    assert "quantization_config" in dict(model.config.extra)
    save_pretrained(model, tmp_path)
    assert "quantization_config" not in json.loads((tmp_path / "config.json").read_text())
    assert_states_equal(load_model(tmp_path).state_dict(), model.state_dict())


# ---------------------------------------------------------------------------- DSpark stages
def dspark_stage_tensors(cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """A few fake `mtp.<s>.*` tensors of a -DSpark release (dspark_v4.md §2.1), stored as released."""
    gen = torch.Generator().manual_seed(3)
    d, r, v = cfg.hidden_size, DSPARK.markov_rank, cfg.vocab_size
    plain = {"mtp.0.main_proj.weight": (d, 3 * d), "mtp.0.main_norm.weight": (d,),
             "mtp.2.markov_head.markov_w1.weight": (v, r), "mtp.2.markov_head.markov_w2.weight": (v, r),
             "mtp.2.confidence_head.proj.weight": (1, d + r), "mtp.2.hc_head_fn": (cfg.hc_mult, cfg.hc_mult * d),
             **{f"mtp.{s}.attn.wq_a.weight": (cfg.q_lora_rank, d) for s in range(3)},
             **{f"mtp.{s}.ffn.experts.0.w1.weight": (cfg.moe_intermediate_size, d) for s in range(3)}}
    out = {}
    for k, shape in plain.items():
        t = torch.randn(shape, generator=gen)
        if ".experts." in k:
            out[k], out[k[:-7] + ".scale"] = quantize_fp4(t)
        elif k.endswith(("main_proj.weight", "wq_a.weight")):
            out[k], out[k[:-7] + ".scale"] = quantize_fp8(t)
        else:
            out[k] = t.bfloat16() if k.endswith(".weight") else t
    return out


def test_dspark_release(tmp_path, hf_state, upstream):
    stages = dspark_stage_tensors(TINY)
    config = dict(config_to_dict(TINY), dspark_block_size=5, dspark_noise_token_id=3,
                  dspark_target_layer_ids=[1, 2, 3], dspark_markov_rank=8)
    path = write(tmp_path, {**upstream, **stages}, config)
    model = load_model(path)
    assert (model.config.mtp_kind, model.config.num_mtp_layers, model.config.dspark) == ("dspark", 3, DSPARK)
    assert not model.has_mtp
    assert_states_equal(model.state_dict(), hf_state)  # stages are not modules: nothing else loaded

    mtp = read_mtp_state(path)
    assert sorted(mtp) == sorted(k for k in stages if not k.endswith(".scale"))
    assert "mtp.2.markov_head.markov_w1.weight" in mtp  # never taken for an expert w1
    assert all(t.dtype == torch.float32 for t in mtp.values())
    main = dequantize_fp8(stages["mtp.0.main_proj.weight"], stages["mtp.0.main_proj.scale"])
    assert torch.equal(mtp["mtp.0.main_proj.weight"], main)
    w1 = dequantize_fp4(stages["mtp.1.ffn.experts.0.w1.weight"], stages["mtp.1.ffn.experts.0.w1.scale"])
    assert torch.equal(mtp["mtp.1.ffn.experts.0.w1.weight"], w1)
    assert torch.equal(mtp["mtp.2.markov_head.markov_w2.weight"], stages["mtp.2.markov_head.markov_w2.weight"].float())

    (path / "config.json").write_text(json.dumps(config_to_dict(TINY)))
    with pytest.raises(ValueError, match="DSpark stages .* lacks .*dspark_block_size"):
        load_model(path)


def test_read_mtp_state_of_plain_checkpoint(tmp_path, upstream):
    assert read_mtp_state(write(tmp_path, upstream, config_to_dict(TINY))) == {}


# ============================================================================ refusals
def edited(upstream: dict, drop=(), **add) -> dict:
    out = {k: v for k, v in upstream.items() if k not in drop}
    out.update({k.replace("__", "."): v for k, v in add.items()})
    return out


@pytest.mark.parametrize("case, message", [
    ("missing", r"1 missing tensors: layers\.1\.attn\.wq_a\.weight"),
    ("missing-expert", r"missing tensors: layers\.2\.ffn\.experts\.3\.w3\.weight"),
    ("unexpected", r"2 unexpected tensors: layers\.0\.attn\.bogus\.weight, layers\.0\.ffn\.experts\.8\.w1\.weight"),
    ("compressor-on-sliding-layer", r"unexpected tensors: layers\.0\.attn\.compressor\.ape"),
    ("mis-shaped", r"mis-shaped tensors: layers\.0\.attn\.wkv\.weight \[5, 5\] \(model "
                   r"model\.layers\.0\.self_attn\.kv_proj\.weight needs \[24, 56\]\)"),
    ("mis-shaped-expert", r"layers\.1\.ffn\.experts\.2\.w2\.weight \[56, 21\]"),
    ("float-tid2eid", r"layers\.0\.ffn\.gate\.tid2eid holds float data"),
    ("fp8-without-scale", r"attn\.wq_b\.weight is torch\.float8_e4m3fn but has no layers\.1\.attn\.wq_b\.scale"),
    ("bad-scale-shape", r"layers\.1\.attn\.wq_b\.scale has shape \[2, 2\]"),
    ("bf16-scale", r"layers\.1\.attn\.wq_b\.scale is torch\.bfloat16; scales must be"),
    ("scale-on-float", r"layers\.1\.attn\.wq_b\.weight has a \.scale sibling but dtype torch\.float32"),
    ("orphan-scale", r"unexpected tensors: layers\.1\.attn\.bogus\.scale"),
    ("tid2eid-range", r"expert ids outside 0\.\.7"),
    ("mixed", "mixes HF names"),
])
def test_bad_checkpoint_refused(tmp_path, upstream, case, message):
    wq_b = upstream["layers.1.attn.wq_b.weight"]
    tensors = {
        "missing": lambda: edited(upstream, drop=["layers.1.attn.wq_a.weight"]),
        "missing-expert": lambda: edited(upstream, drop=["layers.2.ffn.experts.3.w3.weight"]),
        "unexpected": lambda: edited(upstream, layers__0__attn__bogus__weight=torch.ones(2),
                                     layers__0__ffn__experts__8__w1__weight=torch.ones(20, 56)),
        "compressor-on-sliding-layer": lambda: edited(upstream, layers__0__attn__compressor__ape=torch.ones(4, 48)),
        "mis-shaped": lambda: edited(upstream, layers__0__attn__wkv__weight=torch.ones(5, 5)),
        "mis-shaped-expert": lambda: edited(upstream, layers__1__ffn__experts__2__w2__weight=torch.ones(56, 21)),
        "float-tid2eid": lambda: edited(upstream, layers__0__ffn__gate__tid2eid=torch.ones(509, 2)),
        "fp8-without-scale": lambda: edited(upstream, layers__1__attn__wq_b__weight=wq_b.to(torch.float8_e4m3fn)),
        "bad-scale-shape": lambda: edited(upstream, layers__1__attn__wq_b__weight=wq_b.to(torch.float8_e4m3fn),
                                          layers__1__attn__wq_b__scale=torch.ones(2, 2)),
        "bf16-scale": lambda: edited(upstream, layers__1__attn__wq_b__weight=wq_b.to(torch.float8_e4m3fn),
                                     layers__1__attn__wq_b__scale=torch.ones(1, 1, dtype=torch.bfloat16)),
        "scale-on-float": lambda: edited(upstream, layers__1__attn__wq_b__scale=torch.ones(1, 1)),
        "orphan-scale": lambda: edited(upstream, layers__1__attn__bogus__scale=torch.ones(1, 1)),
        "tid2eid-range": lambda: edited(upstream,
                                        layers__1__ffn__gate__tid2eid=torch.full((509, 2), 8, dtype=torch.int32)),
        "mixed": lambda: edited(upstream, model__norm__weight=torch.ones(56)),
    }[case]()
    with pytest.raises(ValueError, match=message):
        load_model(write(tmp_path, tensors, config_to_dict(TINY)))


def test_long_listings_are_cut(tmp_path, upstream):
    # The embedding and one norm per layer: the sizes agree with config.json, most tensors are missing.
    kept = {k: v for k, v in upstream.items() if k == "embed.weight" or k.endswith(".attn_norm.weight")}
    assert len(kept) == 1 + TINY.num_layers
    path = write(tmp_path, kept, config_to_dict(TINY))
    with pytest.raises(ValueError, match=r"missing tensors: .* \(\+\d+ more\)") as info:
        load_model(path)
    assert len(str(info.value)) < 2000


@pytest.mark.parametrize("change,message", [
    (dict(vocab_size=10**10), "says vocab_size 10000000000, but embed.weight is"),
    (dict(num_hidden_layers=10**9), "says num_hidden_layers 1000000000, but its tensors hold layers 0..3"),
    (dict(num_hidden_layers=10**5), "num_hidden_layers 100000"),
    (dict(hidden_size=True), "says hidden_size True"),
    (dict(tie_word_embeddings="no"), "tie_word_embeddings must be true or false"),
    (dict(rms_norm_eps=float("nan")), "rms_norm_eps must be a finite number"),
    (dict(rms_norm_eps=-1e-6), "rms_norm_eps must be a finite number > 0"),
    (dict(swiglu_limit=float("nan")), "swiglu_limit must be a finite number"),
    (dict(hc_mult=2**40), "hc_mult must be a positive int (at most 2^31)"),
    (dict(hc_mult=10**9), "build no model"),  # shapes overflow even on the meta device
    (dict(hc_mult=10**5), "mis-shaped tensors: layers.0.hc_attn_fn [24, 224]"),  # checked before allocating
])
def test_a_lying_config_is_refused_before_anything_is_allocated(tmp_path, upstream, change, message):
    """Sizes are checked against the tensor headers before a model (or a layer_types tuple) is built
    from them; the whole refusal takes well under a second whatever the claimed size."""
    path = write(tmp_path, upstream, dict(config_to_dict(TINY), **change))
    with pytest.raises(ValueError, match=re.escape(message)):
        load_model(path)


def test_a_window_longer_than_the_sequence_budget_does_not_size_the_rings():
    huge = TINY.replace(sliding_window=10**9)
    cache = DeepseekV4.random(TINY, seed=0).new_cache(max_batch=2, max_seq_len=64, max_provisional=8)
    capped = TargetCache(huge, max_batch=2, max_seq_len=64, max_provisional=8)
    assert capped.window_capacity == 63 + 8 and cache.window_capacity <= capped.window_capacity


@pytest.fixture
def sharded(tmp_path, upstream) -> Path:
    return write(tmp_path / "ckpt", upstream, config_to_dict(TINY), shards=3)


def test_missing_shard_refused(sharded):
    (sharded / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(ValueError, match="shard model-00002-of-00003.safetensors is missing"):
        load_model(sharded)


def test_truncated_shard_refused(sharded):
    file = sharded / "model-00003-of-00003.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[: len(data) - 100])
    with pytest.raises(ValueError, match=r"model-00003-of-00003\.safetensors: not a readable safetensors file"):
        CheckpointReader(sharded)


def test_corrupt_header_refused(sharded):
    (sharded / "model-00001-of-00003.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(ValueError, match=r"model-00001-of-00003\.safetensors: not a readable safetensors file"):
        load_model(sharded)


def test_index_pointing_at_absent_tensor_refused(sharded):
    index_file = sharded / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    index["weight_map"]["layers.0.attn.wq_a.weight"] = "model-00001-of-00003.safetensors"
    index["weight_map"]["layers.0.attn.wkv.weight"] = "model-00001-of-00003.safetensors"
    held = set(CheckpointReader(sharded / "model-00001-of-00003.safetensors").keys())
    moved = [k for k in ("layers.0.attn.wq_a.weight", "layers.0.attn.wkv.weight") if k not in held]
    assert moved
    index_file.write_text(json.dumps(index))
    with pytest.raises(ValueError, match=rf"model-00001-of-00003\.safetensors: the index maps .*{re.escape(moved[0])}"):
        load_model(sharded)


def test_hub_cache_snapshot_with_symlinked_shards_loads(tmp_path, sharded):
    """The Hugging Face hub cache layout: snapshots/<rev>/<file> are symlinks into ../../blobs."""
    blobs, snap = tmp_path / "hub" / "blobs", tmp_path / "hub" / "snapshots" / "abc123"
    blobs.mkdir(parents=True)
    snap.mkdir(parents=True)
    for i, f in enumerate(sorted(sharded.iterdir())):
        blob = blobs / f"{i:040x}"
        blob.write_bytes(f.read_bytes())
        (snap / f.name).symlink_to(os.path.relpath(blob, snap))
    assert all((snap / f.name).is_symlink() for f in sharded.iterdir())
    assert_states_equal(load_model(snap).state_dict(), load_model(sharded).state_dict())


@pytest.mark.parametrize("name", ["../elsewhere.safetensors", "sub/model-00001-of-00003.safetensors", "..", ".", ""])
def test_shard_names_with_paths_are_refused(sharded, name):
    index_file = sharded / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    index["weight_map"]["embed.weight"] = name
    index_file.write_text(json.dumps(index))
    with pytest.raises(ValueError, match="not a file name inside the checkpoint directory"):
        CheckpointReader(sharded)


def test_pickled_checkpoints_never_read(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(config_to_dict(TINY)))
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04not-really-a-pickle")
    with pytest.raises(ValueError, match=r"found \['pytorch_model\.bin'\], which would need unpickling"):
        load_model(tmp_path)
    with pytest.raises(ValueError, match=r"not a \.safetensors file"):
        CheckpointReader(tmp_path / "pytorch_model.bin")
    with pytest.raises(FileNotFoundError):
        CheckpointReader(tmp_path / "absent")


def test_reader_single_file_and_lazy_metadata(tmp_path, upstream):
    path = write(tmp_path, upstream, config_to_dict(TINY))
    with CheckpointReader(path / "model.safetensors") as reader:
        assert sorted(reader.keys()) == sorted(upstream)
        assert reader.shape("layers.0.ffn.gate.tid2eid") == (509, 2)
        assert reader.dtype("layers.0.ffn.gate.tid2eid") == torch.int32
        assert torch.equal(reader.get("embed.weight"), upstream["embed.weight"])
        with pytest.raises(KeyError, match="absent"):
            reader.get("absent")
    assert read_config(path / "model.safetensors") == TINY


def test_save_refuses_to_be_shadowed_by_an_index(tmp_path, mtp_model, sharded):
    with pytest.raises(ValueError, match="would shadow"):
        save_pretrained(mtp_model, sharded)


# ============================================================================ end to end
def test_saved_checkpoint_runs_identically_in_transformers(tmp_path, mtp_model):
    """save_pretrained (upstream names) → transformers' own loader → the same logits as our model
    and as our loader's copy (mtp.* is dropped by HF)."""
    save_pretrained(mtp_model, tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = transformers.DeepseekV4ForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    ids = torch.randint(0, TINY.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = hf(input_ids=ids, use_cache=False).logits.float()
        assert_close(mtp_model(ids), expected, what="dspark model vs HF on the saved checkpoint")
        assert torch.equal(load_model(tmp_path)(ids), mtp_model(ids))
