"""V4 MoE block: router (score or hash), routed experts and one shared expert, all SwiGLU-clamped."""

from __future__ import annotations

import torch
from torch import nn

from dspark import ops
from dspark.config import ModelConfig
from dspark.model.layers import linear
from dspark.model.parallel import Parallel


class Router(nn.Module):
    """Score routing (learned scores + fp32 correction bias for selection) or hash routing (tid2eid)."""

    def __init__(self, config: ModelConfig, kind: str):
        super().__init__()
        self.kind, self.kernels = kind, config.kernels
        self.top_k = config.num_experts_per_tok
        self.scoring_func = config.scoring_func
        self.scaling = config.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(config.n_routed_experts, config.hidden_size))
        if kind == "hash":
            self.register_buffer("tid2eid", torch.zeros(config.vocab_size, self.top_k, dtype=torch.long))
        else:
            self.register_buffer("e_score_correction_bias", torch.zeros(config.n_routed_experts))

    def forward(self, x: torch.Tensor, input_ids: torch.Tensor):
        """x [N, D], input_ids [N] → weights fp32 [N, K], indices int64 [N, K]."""
        if self.kind == "hash":
            return ops.hash_route(x, self.weight, self.tid2eid, input_ids, self.scoring_func, self.scaling,
                                  kernels=self.kernels)
        return ops.score_route(x, self.weight, self.e_score_correction_bias, self.top_k, self.scoring_func,
                               self.scaling, kernels=self.kernels)


class Experts(nn.Module):
    """Routed experts stored stacked: gate_up_proj [E, 2I, D] (rows [:I] gate, [I:] up), down_proj [E, D, I].

    With expert parallelism a rank stores experts [first, first + E/P) and computes only their share."""

    def __init__(self, config: ModelConfig, parallel: Parallel = Parallel.single()):
        super().__init__()
        e = parallel.part(config.n_routed_experts, "n_routed_experts")
        i, d = config.moe_intermediate_size, config.hidden_size
        self.gate_up_proj = nn.Parameter(torch.empty(e, 2 * i, d))
        self.down_proj = nn.Parameter(torch.empty(e, d, i))
        self.limit = config.swiglu_limit
        self.kernels = config.kernels
        self.first, self.distributed = parallel.rank * e, parallel.world > 1

    def forward(self, x, weights, indices):
        """indices [N, K] over all E experts → this rank's experts' weighted sum [N, D]."""
        if self.distributed:  # slots routed to another rank's experts route nowhere here
            local = indices - self.first
            indices = torch.where((local >= 0) & (local < self.gate_up_proj.shape[0]), local, -1)
        # ops.experts picks the path (training: grouped; inference: kernels, dense or reference).
        return ops.experts(x, weights, indices, self.gate_up_proj, self.down_proj, self.limit, kernels=self.kernels)


class SharedExpert(nn.Module):
    """One always-on SwiGLU expert; with parallelism a rank holds a slice of its intermediate width
    (SwiGLU is elementwise there), so its output is a partial sum like the routed experts'."""

    def __init__(self, config: ModelConfig, parallel: Parallel = Parallel.single()):
        super().__init__()
        inter = parallel.part(config.moe_intermediate_size, "moe_intermediate_size")
        self.gate_proj = linear(config.hidden_size, inter)
        self.up_proj = linear(config.hidden_size, inter)
        self.down_proj = linear(inter, config.hidden_size)
        self.limit = config.swiglu_limit

    def forward(self, x):
        return self.down_proj(ops.swiglu_ref(self.gate_proj(x), self.up_proj(x), self.limit))


class MoE(nn.Module):
    def __init__(self, config: ModelConfig, kind: str, parallel: Parallel = Parallel.single()):
        super().__init__()
        self.gate = Router(config, kind)  # replicated: every rank routes every token identically
        self.experts = Experts(config, parallel)
        self.shared_experts = SharedExpert(config, parallel)
        self.parallel = parallel

    def forward(self, x: torch.Tensor, input_ids: torch.Tensor, valid: torch.Tensor | None = None,
                expert_load: torch.Tensor | None = None) -> torch.Tensor:
        """x [..., D], input_ids [...] → [..., D]: routed(x) + shared(x).

        Tokens with valid=False (padding) route nowhere. `expert_load` [E], when given, is
        incremented by the number of (token, slot) assignments each expert received.
        """
        flat = x.reshape(-1, x.shape[-1])
        weights, indices = self.gate(flat, input_ids.reshape(-1))
        if valid is not None:
            indices = torch.where(valid.reshape(-1, 1), indices, -1)
        if expert_load is not None:
            live = indices >= 0
            expert_load.scatter_add_(0, indices.clamp(min=0).flatten(), live.flatten().to(expert_load.dtype))
        routed = self.experts(flat, weights, indices).view_as(x)
        return self.parallel.sum(routed + self.shared_experts(x))  # one combine for both partials
