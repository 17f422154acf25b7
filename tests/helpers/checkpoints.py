"""Checkpoint fixtures shared by the checkpoint tests: a safetensors directory writer (one file or
sharded with an index), V4-Flash's published config, an FP8 / FP4 quantised release of upstream
tensors with what a loader must produce from it, and exact state-dict equality."""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import save_file

from dspark.checkpoint.quant import dequantize_fp4, dequantize_fp8, quantize_fp4, quantize_fp8


def write(path: Path, tensors: dict[str, torch.Tensor], config: dict, shards: int = 1) -> Path:
    """A checkpoint directory: config.json + model.safetensors, or `shards` files + index."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config))
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    if shards == 1:
        save_file(tensors, str(path / "model.safetensors"))
        return path
    names = sorted(tensors)
    weight_map = {}
    for s in range(shards):
        file = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = names[s::shards]
        save_file({k: tensors[k] for k in part}, str(path / file))
        weight_map.update({k: file for k in part})
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return path


def assert_states_equal(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert sorted(actual) == sorted(expected)
    for k in expected:
        assert actual[k].dtype == expected[k].dtype, k
        assert torch.equal(actual[k], expected[k]), k


FLASH_LEGACY = {  # V4-Flash as published: legacy upstream field names (deepseek_v4.md §2)
    "model_type": "deepseek_v4", "architectures": ["DeepseekV4ForCausalLM"], "vocab_size": 129280,
    "hidden_size": 4096, "num_hidden_layers": 43, "num_attention_heads": 64, "num_key_value_heads": 1,
    "head_dim": 512, "qk_rope_head_dim": 64, "q_lora_rank": 1024, "o_groups": 8, "o_lora_rank": 1024,
    "compress_ratios": [0, 0] + [4, 128] * 20 + [4, 0], "sliding_window": 128, "index_n_heads": 64,
    "index_head_dim": 128, "index_topk": 512, "hc_mult": 4, "hc_sinkhorn_iters": 20, "hc_eps": 1e-6,
    "rms_norm_eps": 1e-6, "num_hash_layers": 3, "n_routed_experts": 256, "n_shared_experts": 1,
    "num_experts_per_tok": 6, "moe_intermediate_size": 2048, "scoring_func": "sqrtsoftplus", "norm_topk_prob": True,
    "routed_scaling_factor": 1.5, "swiglu_limit": 10.0, "topk_method": "noaux_tc", "rope_theta": 10000,
    "compress_rope_theta": 160000,
    "rope_scaling": {"type": "yarn", "factor": 16, "original_max_position_embeddings": 65536, "beta_fast": 32,
                     "beta_slow": 1},
    "max_position_embeddings": 1048576, "num_nextn_predict_layers": 1, "tie_word_embeddings": False,
    "bos_token_id": 0, "eos_token_id": 1,
    "quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "scale_fmt": "ue8m0",
                            "weight_block_size": [128, 128]},
}


# Released in BF16 without scales (HF's loader notes): compressor / indexer projections.
BF16_PROJECTIONS = ("compressor.wkv.weight", "compressor.wgate.weight", "indexer.weights_proj.weight")


def quantise_release(up: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Upstream tensors → (stored as in a V4 release, what a loader must produce from them)."""
    stored, expected = {}, {}
    for k, t in up.items():
        if re.search(r"\.experts\.\d+\.w[123]\.weight$", k):
            stored[k], stored[k[:-7] + ".scale"] = quantize_fp4(t)
            expected[k] = dequantize_fp4(stored[k], stored[k[:-7] + ".scale"])
        elif k.endswith(".weight") and t.dim() == 2 and not k.endswith(BF16_PROJECTIONS) and k not in (
                "embed.weight", "head.weight") and not k.endswith("gate.weight"):
            stored[k], stored[k[:-7] + ".scale"] = quantize_fp8(t)
            expected[k] = dequantize_fp8(stored[k], stored[k[:-7] + ".scale"])
        elif k.endswith(".weight"):  # norms, embedding, head, router, compressor projections
            stored[k] = t.bfloat16()
            expected[k] = stored[k].float()
        else:  # mHC, sinks, ape, gate bias in fp32; tid2eid int32
            stored[k] = expected[k] = t
    return stored, expected
