"""The dense V4 forward against HF transformers 5.24 (deepseek_v4.md §14), in fp32 and bf16."""

from __future__ import annotations

import warnings

import pytest
import torch

from dspark import ops
from dspark.config import ModelConfig
from dspark.checkpoint import config_from_dict
from dspark.model.target import DeepseekV4
from tests.compare import assert_close
from tests.helpers.hf import hf_logits, hf_model_like, transformers

# fp32 parity bound of the issue; the observed error is ~5e-6 on logits of magnitude ~4.
PARITY_ATOL = 1e-4


@pytest.fixture
def record_index_ties(monkeypatch):
    """Wrap the indexer selection to record whether a selection boundary fell on an exact score tie:
    HF's torch.topk breaks such ties differently from our lowest-index rule (deepseek_v4.md §9.4)."""
    ties = []
    real = ops.indexer_select

    def select(q, keys, w, visible, k, **kwargs):
        scores, top = real(q, keys, w, visible, k, **kwargs)
        n = scores.shape[-1]
        if 0 < k < n:
            hidden = torch.arange(n) >= visible.unsqueeze(-1)
            vals = scores.masked_fill(hidden, float("-inf")).sort(dim=-1, descending=True).values
            kth, nxt = vals[..., k - 1], vals[..., k]
            ties.append(bool(((kth == nxt) & torch.isfinite(nxt)).any()))
        return scores, top

    monkeypatch.setattr(ops, "indexer_select", select)
    return ties


def random_ids(config: ModelConfig, batch: int, length: int, seed: int) -> torch.Tensor:
    return torch.randint(0, config.vocab_size, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_tiny_matches_hf_fp32(seed, record_index_ties):
    config = ModelConfig.tiny()
    ours = DeepseekV4.random(config, seed=seed)
    hf = hf_model_like(ours)
    # Lengths below, at and across the window (16), CSA windows (4) and HCA windows (16).
    for length in (1, 13, 16, 17, 40, 64, 100):
        ids = random_ids(config, 2, length, seed * 1000 + length)
        with torch.no_grad():
            got = ours(ids)
        assert not any(record_index_ties), "exact indexer-score tie: choose another seed"
        assert_close(got, hf_logits(hf, ids), atol=PARITY_ATOL, rtol=0, what=f"logits S={length}")


def flash_style_legacy_dict() -> dict:
    """A Flash-style config written with upstream's legacy field names (CSA 4, HCA 128, window 128)."""
    return {
        "model_type": "deepseek_v4", "vocab_size": 384, "hidden_size": 64, "num_hidden_layers": 4,
        "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 32, "qk_rope_head_dim": 8,
        "q_lora_rank": 48, "o_groups": 2, "o_lora_rank": 16, "moe_intermediate_size": 32,
        "n_routed_experts": 8, "n_shared_experts": 1, "num_experts_per_tok": 2, "scoring_func": "sqrtsoftplus",
        "norm_topk_prob": True, "routed_scaling_factor": 1.5, "swiglu_limit": 10.0,
        "compress_ratios": [0, 4, 128, 4, 0], "num_hash_layers": 2, "sliding_window": 128,
        "index_n_heads": 32, "index_head_dim": 16, "index_topk": 16, "hc_mult": 4, "hc_sinkhorn_iters": 20,
        "hc_eps": 1e-6, "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "compress_rope_theta": 160000.0,
        "rope_scaling": {"type": "yarn", "factor": 16.0, "original_max_position_embeddings": 256,
                         "beta_fast": 32, "beta_slow": 1},
        "max_position_embeddings": 4096, "num_nextn_predict_layers": 1, "tie_word_embeddings": False,
        "bos_token_id": 0, "eos_token_id": 1,
    }


def test_flash_style_legacy_config_matches_hf(record_index_ties):
    raw = flash_style_legacy_dict()
    config = config_from_dict(raw)
    assert config.layer_types == ("sliding", "csa", "hca", "csa")
    assert config.mlp_layer_types == ("hash", "hash", "score", "score")
    ours = DeepseekV4.random(config, seed=7)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = transformers.DeepseekV4ForCausalLM(transformers.DeepseekV4Config(**raw)).eval()
    hf.load_state_dict({k: v for k, v in ours.state_dict().items() if not k.startswith("mtp.")}, strict=True)
    ids = random_ids(config, 1, 320, 3)  # 80 CSA entries (top-16 selected), 2 HCA entries, window 128
    with torch.no_grad():
        got = ours(ids)
    assert not any(record_index_ties)
    assert_close(got, hf_logits(hf, ids), atol=PARITY_ATOL, rtol=0, what="flash-style logits")


def test_bf16_error_within_hf_bf16_error(tmp_path):
    """bf16 flips discrete choices (expert and indexer top-k) at random in both implementations, so
    the per-case max error is noise; the summed mean-absolute error over cases is the stable measure."""
    config = ModelConfig.tiny()
    ours_total = hf_total = 0.0
    for seed in (0, 1):
        ours32 = DeepseekV4.random(config, seed=seed)
        hf32 = hf_model_like(ours32)
        hf16 = hf_model_like(ours32, tmp_path / f"s{seed}", dtype=torch.bfloat16)
        ours16 = DeepseekV4.random(config, seed=seed, dtype=torch.bfloat16)
        for length in (13, 64, 100):
            ids = random_ids(config, 2, length, length)
            ref = hf_logits(hf32, ids)
            with torch.no_grad():
                ours_total += float((ours16(ids) - ref).abs().mean())
            hf_total += float((hf_logits(hf16, ids) - ref).abs().mean())
    assert ours_total <= 1.5 * hf_total + 1e-3, (ours_total, hf_total)


def test_fp32_islands_stay_fp32():
    model = DeepseekV4.random(ModelConfig.tiny(), dtype=torch.bfloat16)
    dtypes = {name: p.dtype for name, p in model.named_parameters()}
    dtypes.update({name: b.dtype for name, b in model.named_buffers() if b.is_floating_point()})
    for name, dtype in dtypes.items():
        island = any(key in name for key in ("norm", "_hc.", "hc_head", "sinks", "position_bias",
                                              "e_score_correction_bias", "inv_freq"))
        assert dtype == (torch.float32 if island else torch.bfloat16), name
    assert model(torch.tensor([[3, 4, 5]])).dtype == torch.float32


def test_bad_input_is_refused():
    config = ModelConfig.tiny(max_position_embeddings=32)
    model = DeepseekV4.random(config)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        model(torch.tensor([[1, config.vocab_size]]))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        model(torch.tensor([[-1, 2]]))
    with pytest.raises(ValueError, match="exceeds max_position_embeddings"):
        model(torch.zeros(1, 33, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\[B, S\]"):
        model(torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="int64 or int32"):
        model(torch.tensor([[1.0, 2.0]]))


def test_config_refuses_unknown_layer_types():
    with pytest.raises(ValueError, match="unknown layer types"):
        ModelConfig.tiny(layer_types=("sliding", "csa", "mla", "csa"))
    with pytest.raises(ValueError, match="unknown mlp layer types"):
        ModelConfig.tiny(mlp_layer_types=("hash", "dense", "score", "score"))
    with pytest.raises(ValueError, match="layer_types has 3 entries"):
        ModelConfig.tiny(layer_types=("sliding", "csa", "hca"))
    with pytest.raises(ValueError, match="kernels 'cuda' not in"):
        ModelConfig.tiny(kernels="cuda")
    assert ModelConfig.tiny(kernels="ref") == ModelConfig.tiny()  # how it runs, not what it is


def test_truncated_model_keeps_shapes():
    full = ModelConfig.flash()
    proxy = ModelConfig.flash_proxy(num_layers=3)
    assert proxy.num_layers == 3 and proxy.layer_types == full.layer_types[:3]
    assert proxy.hidden_size == full.hidden_size and proxy.n_routed_experts == full.n_routed_experts
    with pytest.raises(ValueError, match="num_layers override"):
        full.truncated(44)
