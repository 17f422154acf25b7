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
