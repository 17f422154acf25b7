"""mHC modules: the per-sublayer hyper-connection and the final stream collapse (fp32 parameters)."""

from __future__ import annotations

import torch
from torch import nn

from dspark import ops
from dspark.config import ModelConfig


class HyperConnection(nn.Module):
    """Computes (post, comb) and the collapsed block input from the N residual streams."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        n = config.hc_mult
        self.kernels = config.kernels
        self.fn = nn.Parameter(torch.empty((2 + n) * n, n * config.hidden_size))
        self.base = nn.Parameter(torch.empty((2 + n) * n))
        self.scale = nn.Parameter(torch.empty(3))
        self.sinkhorn_iters = config.hc_sinkhorn_iters
        self.hc_eps = config.hc_eps
        self.rms_eps = config.rms_norm_eps

    def forward(self, streams: torch.Tensor):
        """streams [..., N, D] → post [..., N], comb [..., N, N] (fp32), block input [..., D]."""
        pre, post, comb = ops.hc_weights(streams, self.fn, self.base, self.scale, self.sinkhorn_iters,
                                         self.hc_eps, self.rms_eps, kernels=self.kernels)
        return post, comb, ops.hc_collapse(pre, streams, kernels=self.kernels)


class HyperHead(nn.Module):
    """Final collapse of the N streams into one hidden vector (before the final norm)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        n = config.hc_mult
        self.kernels = config.kernels
        self.hc_fn = nn.Parameter(torch.empty(n, n * config.hidden_size))
        self.hc_base = nn.Parameter(torch.empty(n))
        self.hc_scale = nn.Parameter(torch.empty(1))
        self.hc_eps = config.hc_eps
        self.rms_eps = config.rms_norm_eps

    def forward(self, streams: torch.Tensor) -> torch.Tensor:
        return ops.hc_head(streams, self.hc_fn, self.hc_base, self.hc_scale, self.hc_eps, self.rms_eps,
                           kernels=self.kernels)
