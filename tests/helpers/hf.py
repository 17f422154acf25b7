"""Build HF transformers' DeepseekV4ForCausalLM with exactly the weights of a dspark model.

Our parameter names equal HF's in-memory names, so weights move with a strict `load_state_dict`.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from dspark.config import ModelConfig
from dspark.checkpoint import config_to_dict

transformers = pytest.importorskip("transformers")


def hf_config(config: ModelConfig):
    d = config_to_dict(config)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return transformers.DeepseekV4Config(**d)


def hf_model_like(model, tmp_path=None, dtype: torch.dtype = torch.float32):
    """An HF model holding `model`'s weights. For bf16 it goes through save/from_pretrained, which
    is how HF keeps its fp32 islands (`model.to(bf16)` would cast them too)."""
    cfg = hf_config(model.config)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = transformers.DeepseekV4ForCausalLM(cfg).eval()
    state = {k: v.float() if v.is_floating_point() else v for k, v in model.state_dict().items()
             if not k.startswith("mtp.")}
    hf.load_state_dict(state, strict=True)
    if dtype == torch.float32:
        return hf
    assert tmp_path is not None
    hf.save_pretrained(tmp_path / "hf")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # grouped_mm on CPU needs 16-byte strides, which the odd tiny dims lack: use the eager expert loop.
        return transformers.DeepseekV4ForCausalLM.from_pretrained(tmp_path / "hf", dtype=dtype,
                                                                  experts_implementation="eager").eval()


@torch.no_grad()
def hf_logits(hf, input_ids: torch.Tensor) -> torch.Tensor:
    return hf(input_ids=input_ids, use_cache=False).logits.float()


# ------------------------------------------------------------------ dense HF families (Qwen3, Llama-3, Gemma 4)
# Tiny configs with small odd dims and GQA group 2; built and saved with transformers' own classes.
DENSE_FAMILIES = ("qwen3", "qwen3-tied", "llama", "gemma4")


def dense_hf_config(family: str):
    common = dict(vocab_size=97, hidden_size=40, intermediate_size=52, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=10, max_position_embeddings=256, rms_norm_eps=1e-6,
                  bos_token_id=1, eos_token_id=2, pad_token_id=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if family in ("qwen3", "qwen3-tied"):
            return transformers.Qwen3Config(**common, tie_word_embeddings=family == "qwen3-tied",
                                            rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
        if family == "llama":
            # llama3 scaling with an original length of 16 so that low, medium and high frequencies all occur.
            rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                    "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
            return transformers.LlamaConfig(**common, rope_parameters=rope, attention_bias=True, mlp_bias=True)
        if family in ("gemma4", "gemma4-k-eq-v"):
            # Sliding layers (window 5) and full layers with a wider head and proportional partial RoPE, in
            # turn; soft-capped logits; no per-layer input embeddings.
            return transformers.Gemma4TextConfig(
                **{**common, "head_dim": 12, "num_hidden_layers": 4}, global_head_dim=16, sliding_window=5,
                layer_types=["sliding_attention", "full_attention"] * 2,
                hidden_size_per_layer_input=0, final_logit_softcapping=7.0,
                # the k-eq-v variant: full layers take V from k_proj and have one KV head
                **(dict(attention_k_eq_v=True, num_global_key_value_heads=1) if family == "gemma4-k-eq-v" else {}),
                rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                                 "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.5,
                                                    "rope_theta": 1000000.0}})
    raise ValueError(family)


def dense_hf_model(family: str, seed: int = 0):
    """A random fp32 HF model of `family` whose every weight is non-trivial (norm weights near 1, not 1)."""
    config = dense_hf_config(family)
    cls = {"qwen3": transformers.Qwen3ForCausalLM, "qwen3-tied": transformers.Qwen3ForCausalLM,
           "llama": transformers.LlamaForCausalLM, "gemma4": transformers.Gemma4ForCausalLM,
           "gemma4-k-eq-v": transformers.Gemma4ForCausalLM}[family]
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = cls(config).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            z = torch.randn(p.shape, generator=g)
            if "norm" in name:
                p.copy_(1 + 0.2 * z)
            elif name.endswith("bias"):
                p.copy_(0.1 * z)
            else:
                p.copy_(z / p.shape[-1] ** 0.5)
        for name, b in model.named_buffers():
            if name.endswith("layer_scalar"):
                b.copy_(1 + 0.2 * torch.randn(b.shape, generator=g))
    return model


def save_dense_hf(family: str, path, seed: int = 0, dtype: torch.dtype = torch.float32):
    """Save a tiny random HF model of `family` to `path` (an HF snapshot directory); returns the fp32 model."""
    model = dense_hf_model(family, seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.to(dtype).save_pretrained(path)
        model.float()
    return model
