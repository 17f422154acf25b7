"""The DeepSeek-V4 decoder layer (attention + MoE inside mHC), the attention callables that run it
dense or over the paged cache, and what every V4-layout module shares: the fp32 islands kept
whatever the model dtype (deepseek_v4.md §3) and the random initialisation of §14.1. Used by the
target, its MTP module and the V4-layout DSpark draft.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from dspark import ops
from dspark.config import ModelConfig
from dspark.model.attention import Attention
from dspark.model.batch import StepIndex
from dspark.model.cache import LayerCache
from dspark.model.layers import RMSNorm, RotaryTable, rope_inv_freq
from dspark.model.mhc import HyperConnection, HyperHead
from dspark.model.moe import MoE
from dspark.model.parallel import Parallel

# Parameters kept in fp32 whatever the model dtype (deepseek_v4.md §3): every norm weight, all mHC
# parameters, sinks, compressor position biases and the router correction bias.
_FP32_MODULES = (RMSNorm, HyperConnection, HyperHead)
_FP32_NAMES = ("sinks", "position_bias", "e_score_correction_bias")

AttendFn = Callable[[Attention, torch.Tensor], torch.Tensor]


class DecoderLayer(nn.Module):
    """Attention + MoE, each wrapped in an mHC collapse / expand of the N residual streams."""

    def __init__(self, config: ModelConfig, layer_type: str, mlp_type: str, parallel: Parallel = Parallel.single()):
        super().__init__()
        self.kernels = config.kernels
        self.self_attn = Attention(config, layer_type, parallel)
        self.mlp = MoE(config, mlp_type, parallel)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.attn_hc = HyperConnection(config)
        self.ffn_hc = HyperConnection(config)

    def forward(self, streams: torch.Tensor, input_ids: torch.Tensor, attend: AttendFn,
                valid: torch.Tensor | None = None, expert_load: torch.Tensor | None = None) -> torch.Tensor:
        """streams [..., N, D], input_ids [...] → streams. `attend(self_attn, x)` runs the attention
        (dense or cached) on the normed block input x [..., D]; `valid` False marks padding."""
        post, comb, x = self.attn_hc(streams)
        streams = ops.hc_expand(post, comb, attend(self.self_attn, self.input_layernorm(x)), streams,
                                kernels=self.kernels)
        post, comb, x = self.ffn_hc(streams)
        f = self.mlp(self.post_attention_layernorm(x), input_ids, valid, expert_load)
        return ops.hc_expand(post, comb, f, streams, kernels=self.kernels)


def dense_attend(attn: Attention, x: torch.Tensor) -> torch.Tensor:
    return attn(x)


def cached_attend(idx: StepIndex, cache: LayerCache, block_table: torch.Tensor, dummy_slot: int) -> AttendFn:
    return lambda attn, x: attn.forward_cached(x, idx, cache, block_table, dummy_slot)



def cast_keeping_fp32_islands(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Cast floating parameters and buffers to `dtype`, keeping the fp32 islands of deepseek_v4.md §3."""
    for m in module.modules():
        keep = isinstance(m, _FP32_MODULES)
        for name, p in list(m.named_parameters(recurse=False)):
            target = torch.float32 if keep or name in _FP32_NAMES else dtype
            if p.dtype != target:
                p.data = p.data.to(target)
        for name, b in list(m.named_buffers(recurse=False)):
            if b.is_floating_point() and name not in _FP32_NAMES and name != "inv_freq" and b.dtype != dtype:
                setattr(m, name, b.to(dtype))
    return module


def reset_rotary_buffers(module: nn.Module) -> None:
    """Recompute every rotary table's inv_freq (non-persistent, so garbage after `to_empty`)."""
    for m in module.modules():
        if isinstance(m, RotaryTable):
            m.inv_freq = rope_inv_freq(m.rope, m.rope_dim).to(m.inv_freq.device)


@torch.no_grad()
def randomize_(model: nn.Module, gen: torch.Generator) -> None:
    """Fill every parameter and buffer with non-degenerate random values (deepseek_v4.md §14.1):
    norm weights 1+0.1z, sinks z, position_bias 0.5z, mHC base 0.5z / scale 1+0.2z / fn 0.05z,
    correction bias 0.1z, tid2eid K distinct experts per token, matrices z/sqrt(fan_in)."""

    def z(t: torch.Tensor) -> torch.Tensor:
        return torch.randn(t.shape, generator=gen).to(t.device, t.dtype)

    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if isinstance(module, RMSNorm):
                p.copy_(1 + 0.1 * z(p))
            elif name in ("sinks",):
                p.copy_(z(p))
            elif name in ("position_bias", "base", "hc_base"):
                p.copy_(0.5 * z(p))
            elif name in ("scale", "hc_scale"):
                p.copy_(1 + 0.2 * z(p))
            elif name in ("fn", "hc_fn"):
                p.copy_(0.05 * z(p))
            else:
                p.copy_(z(p) / p.shape[-1] ** 0.5)
        for name, b in module.named_buffers(recurse=False):
            if name == "e_score_correction_bias":
                b.copy_(0.1 * z(b))
            elif name == "tid2eid":
                n_experts = module.weight.shape[0]
                b.copy_(torch.rand(b.shape[0], n_experts, generator=gen).argsort(-1)[:, : b.shape[1]].to(b.device))
