"""The MTP module against an independent transcription of deepseek_v4.md §12.2.

The transcription uses HF's own V4 decoder layer for the block (sliding window, score-routed) and
plain torch for the rest, so it shares no code with dspark's MTP.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from dspark.config import ModelConfig
from dspark.model.mtp import mtp_forward
from dspark.model.target import DeepseekV4
from tests.compare import assert_close
from tests.helpers.hf import hf_config

hf_v4 = pytest.importorskip("transformers.models.deepseek_v4.modeling_deepseek_v4")


def rms(x, w, eps):
    x = x.float()
    return x * torch.rsqrt(x.square().mean(-1, keepdim=True) + eps) * w


def transcribed_mtp(model: DeepseekV4, H: torch.Tensor, next_ids: torch.Tensor) -> torch.Tensor:
    cfg = model.config
    sd = {k[len("mtp.0."):]: v for k, v in model.state_dict().items() if k.startswith("mtp.0.")}
    eps = cfg.rms_norm_eps
    e = rms(model.model.embed_tokens.weight[next_ids], sd["enorm.weight"], eps)  # [B, S, D]
    y = (e @ sd["e_proj.weight"].T).unsqueeze(2) + rms(H, sd["hnorm.weight"], eps) @ sd["h_proj.weight"].T

    # The block: HF's decoder layer configured as a sliding-window, score-routed layer.
    hcfg = hf_config(cfg.replace(num_layers=1, layer_types=("sliding",), mlp_layer_types=("score",)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        layer = hf_v4.DeepseekV4DecoderLayer(hcfg, 0).eval()
        rotary = hf_v4.DeepseekV4RotaryEmbedding(hcfg)
    block = {k: v for k, v in sd.items() if not k.split(".")[0] in ("enorm", "hnorm", "e_proj", "h_proj",
                                                                    "hc_head", "norm")}
    layer.load_state_dict(block, strict=True)
    b, s = next_ids.shape
    pos = torch.arange(s).unsqueeze(0).expand(b, s)
    i, j = torch.arange(s)[:, None], torch.arange(s)[None, :]
    visible = (j <= i) & (j > i - cfg.sliding_window)
    mask = torch.zeros(s, s).masked_fill(~visible, torch.finfo(torch.float32).min).expand(b, 1, s, s)
    with torch.no_grad():
        y = layer(y, input_ids=next_ids, position_embeddings={"main": rotary(y, pos, layer_type="main")},
                  position_ids=pos, attention_mask=mask)

    flat = y.flatten(2)
    flat = flat * torch.rsqrt(flat.square().mean(-1, keepdim=True) + eps)
    pre = torch.sigmoid((flat @ sd["hc_head.hc_fn"].T) * sd["hc_head.hc_scale"] + sd["hc_head.hc_base"]) + cfg.hc_eps
    h = rms((pre.unsqueeze(-1) * y).sum(2), sd["norm.weight"], eps)
    return h @ model.lm_head.weight.T


def test_mtp_matches_transcription():
    config = ModelConfig.tiny()
    model = DeepseekV4.random(config, seed=3)
    assert model.has_mtp
    ids = torch.randint(0, config.vocab_size, (2, 41), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        streams = model.run(ids).streams
        logits, out = mtp_forward(model, streams[:, :-1], ids[:, 1:])
        expected = transcribed_mtp(model, streams[:, :-1], ids[:, 1:])
    assert out.shape == streams[:, :-1].shape
    assert_close(logits, expected, atol=1e-4, rtol=0, what="mtp logits")
