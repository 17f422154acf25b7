"""HF snapshot directories of dense families → DenseTarget: config translation and its refusals by name,
sharded and multimodal-wrapped Gemma 4 layouts, strict tensor names, and DeepSpec's golden tiny Qwen3 with
its DSpark / DFlash drafts end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import dspark
from dspark.checkpoint import load_draft
from dspark.checkpoint.hf import dense_config_from_dict, read_dense_config
from dspark.decode import generate
from dspark.model import DenseTarget
from tests.helpers.hf import save_dense_hf

transformers = pytest.importorskip("transformers")

GOLDEN = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "deepspec_golden"
needs_golden = pytest.mark.skipif(not GOLDEN.is_dir(), reason=f"DeepSpec golden fixture not found at {GOLDEN}")


def _ids(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 97, (1, n), generator=torch.Generator().manual_seed(seed))


def _edit_config(path: Path, **changes) -> None:
    file = path / "config.json"
    file.write_text(json.dumps({**json.loads(file.read_text()), **changes}))


@torch.no_grad()
def test_sharded_snapshot_and_generation_config_eos(tmp_path):
    hf = save_dense_hf("qwen3", tmp_path / "single")
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="30KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    (tmp_path / "sharded" / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 5]}))
    single, sharded = dspark.load_target(tmp_path / "single"), dspark.load_target(tmp_path / "sharded")
    assert isinstance(sharded, DenseTarget) and sharded.config.family == "qwen3"
    assert single.config.eos_token_ids == (2,) and sharded.config.eos_token_ids == (2, 5)
    torch.testing.assert_close(sharded(_ids(12)), single(_ids(12)), rtol=0, atol=0)


@torch.no_grad()
def test_truncated_load_keeps_the_first_layers(tmp_path):
    save_dense_hf("llama", tmp_path)
    full, first = dspark.load_target(tmp_path), dspark.load_target(tmp_path, num_layers=2)
    assert first.config.num_layers == 2 and len(first.model.layers) == 2
    torch.testing.assert_close(first.run(_ids(9), (1,)).taps[1], full.run(_ids(9), (1,)).taps[1], rtol=0, atol=0)


@torch.no_grad()
def test_multimodal_gemma4_reads_the_language_model(tmp_path):
    """model_type gemma4: text_config + weights under model.language_model., vision tower ignored."""
    hf = save_dense_hf("gemma4", tmp_path / "text")
    wrapped = tmp_path / "wrapped"
    wrapped.mkdir()
    state = {"model.language_model." + k[len("model."):]: v for k, v in load_file(tmp_path / "text" /
                                                                                   "model.safetensors").items()}
    state["model.vision_tower.encoder.weight"] = torch.zeros(3, 2)
    save_file(state, wrapped / "model.safetensors")
    text = json.loads((tmp_path / "text" / "config.json").read_text())
    (wrapped / "config.json").write_text(json.dumps({"model_type": "gemma4", "text_config": text,
                                                     "tie_word_embeddings": True, "eos_token_id": [1, 2]}))
    target = dspark.load_target(wrapped)
    assert target.config.family == "gemma4" and target.config.eos_token_ids == (1, 2)
    torch.testing.assert_close(target(_ids(14)), hf(input_ids=_ids(14)).logits, rtol=0, atol=1e-4)


@torch.no_grad()
def test_fields_left_out_take_hf_defaults(tmp_path):
    """Layer types, the Gemma 4 global head (global_head_dim spelling, no per_layer_config) and its last layer
    forced to full attention, as HF's config classes derive them from the same config.json."""
    hf = save_dense_hf("gemma4", tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    raw.pop("per_layer_config")
    (tmp_path / "config.json").write_text(json.dumps({**raw, "global_head_dim": 16}))
    torch.testing.assert_close(dspark.load_target(tmp_path)(_ids(9)), hf(input_ids=_ids(9)).logits, rtol=0, atol=1e-4)
    common = dict(vocab_size=11, hidden_size=8, intermediate_size=8, num_hidden_layers=7, num_attention_heads=2,
                  num_key_value_heads=1, head_dim=4)
    cases = [("qwen3", transformers.Qwen3Config, dict(use_sliding_window=True, sliding_window=3, max_window_layers=4)),
             ("gemma4_text", transformers.Gemma4TextConfig, dict(hidden_size_per_layer_input=0)),
             ("gemma4_text", transformers.Gemma4TextConfig,
              dict(hidden_size_per_layer_input=0, layer_types=["sliding_attention"] * 7))]
    for model_type, cls, extra in cases:
        mine = dense_config_from_dict({"model_type": model_type, **common, **extra})[0]
        theirs = cls(**common, **extra)
        assert [{"full": "full_attention", "sliding": "sliding_attention"}[t] for t in mine.layer_types] == \
            theirs.layer_types, model_type
        assert [mine.layer_head_dim(i) for i in range(7)] == [
            theirs.per_layer_config[i].head_dim if model_type == "gemma4_text" else theirs.head_dim for i in range(7)]


@torch.no_grad()
def test_gemma4_k_eq_v_full_layers(tmp_path):
    """attention_k_eq_v: full layers have no v_proj (V is k_proj's output, v-normed) and their own KV heads."""
    hf = save_dense_hf("gemma4-k-eq-v", tmp_path)
    target = dspark.load_target(tmp_path)
    assert target.config.attention_k_eq_v and target.config.global_num_kv_heads == 1
    assert target.model.layers[1].self_attn.v_proj is None
    torch.testing.assert_close(target(_ids(17)), hf(input_ids=_ids(17)).logits, rtol=0, atol=1e-4)


@pytest.mark.parametrize("family,changes,field", [
    ("qwen3", {"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0}}, "rope_type 'yarn'"),
    ("qwen3", {"hidden_act": "gelu"}, "hidden_act"),
    ("qwen3", {"layer_types": ["full_attention", "chunked_attention", "full_attention"]}, "chunked_attention"),
    ("llama", {"rope_parameters": None, "rope_theta": 1e4, "rope_scaling": {"rope_type": "dynamic", "factor": 2.0}},
     "rope_type 'dynamic'"),
    ("gemma4", {"hidden_size_per_layer_input": 8}, "hidden_size_per_layer_input"),
    ("gemma4", {"num_kv_shared_layers": 2}, "num_kv_shared_layers"),
    ("gemma4", {"enable_moe_block": True}, "enable_moe_block"),
    ("gemma4", {"use_bidirectional_attention": "vision"}, "use_bidirectional_attention"),
    ("gemma4", {"per_layer_config": {"1": {"head_dim": 16, "sliding_window": 3}, "3": {"head_dim": 16}}},
     "per_layer_config"),
    ("gemma4", {"model_type": "gemma3_text"}, "model_type 'gemma3_text'"),
    ("qwen3", {"quantization_config": {"quant_method": "fp8"}}, "quantization_config"),
])
def test_unsupported_fields_are_refused_by_name(tmp_path, family, changes, field):
    save_dense_hf(family, tmp_path)
    _edit_config(tmp_path, **changes)
    with pytest.raises(ValueError, match=field) as e:
        read_dense_config(tmp_path) if changes.get("model_type") is None else dspark.load_target(tmp_path)
    assert "\n" not in str(e.value)


def test_missing_unexpected_and_misshaped_tensors_are_refused_by_name(tmp_path):
    save_dense_hf("qwen3", tmp_path)
    file = tmp_path / "model.safetensors"
    state = load_file(file)
    save_file({k: v for k, v in state.items() if k != "model.layers.1.self_attn.k_norm.weight"}, file)
    with pytest.raises(ValueError, match=r"missing tensors model\.layers\.1\.self_attn\.k_norm\.weight"):
        dspark.load_target(tmp_path)
    save_file({**state, "model.layers.0.mlp.experts.weight": torch.zeros(2)}, file)
    with pytest.raises(ValueError, match=r"unexpected tensors model\.layers\.0\.mlp\.experts\.weight"):
        dspark.load_target(tmp_path)
    save_file(state, file)
    _edit_config(tmp_path, intermediate_size=50)
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.gate_proj\.weight has shape \[52, 40\]"):
        dspark.load_target(tmp_path)


@needs_golden
@torch.no_grad()
def test_golden_qwen3_logits_and_taps():
    """DeepSpec's tiny Qwen3 (bf16 weights, upcast): logits and the layer [0, 1, 2] context features equal
    golden_target.safetensors, which HF computed in fp32."""
    target = dspark.load_target(GOLDEN / "target")
    golden = load_file(GOLDEN / "target" / "golden_target.safetensors")
    out = target.run(golden["prompt_ids"][None], tap_layers=(0, 1, 2))
    torch.testing.assert_close(out.logits[0], golden["logits"], rtol=1e-5, atol=1e-5)
    features = torch.cat([out.taps[j][0] for j in (0, 1, 2)], dim=-1)
    torch.testing.assert_close(features, golden["ctx_features_fp32"], rtol=1e-5, atol=1e-5)


@needs_golden
@pytest.mark.parametrize("method,case", [("dspark", "dspark_vanilla"), ("dflash", "dflash")])
def test_golden_drafts_run_end_to_end_on_the_golden_target(method, case):
    target = dspark.load_target(GOLDEN / "target")
    draft = load_draft(GOLDEN / case / "checkpoint", target)
    assert draft.embed_tokens.weight.data_ptr() != 0
    prompts = [load_file(GOLDEN / "target" / "golden_target.safetensors")["prompt_ids"].tolist(),
               _ids(11, 3)[0].tolist()]
    ar = generate(target, prompts, method="ar", max_new_tokens=12)
    spec = generate(target, prompts, method=method, draft=draft, max_new_tokens=12)
    assert [r.token_ids for r in spec] == [r.token_ids for r in ar]
    assert all(r.stats.rounds > 0 and max(r.stats.proposal_lens) > 0 for r in spec)  # drafts were verified


@needs_golden
def test_draft_of_another_target_is_refused(tmp_path):
    save_dense_hf("qwen3", tmp_path)
    with pytest.raises(ValueError, match=r"target hidden size of 64; the target \(DenseTarget\) has 40"):
        load_draft(GOLDEN / "dflash" / "checkpoint", dspark.load_target(tmp_path))
