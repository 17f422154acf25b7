"""Small modules with no policy: RMSNorm, rotary tables, the grouped output projection."""

from __future__ import annotations

import math

import torch
from torch import nn

from dspark.config import RopeConfig


class RMSNorm(nn.Module):
    """Weighted RMSNorm; the weight stays fp32 and the product is taken in fp32, cast once."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return (self.weight.float() * (xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + self.eps))).to(x.dtype)


def unweighted_rms_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm without weight: rsqrt in fp32, product in x's dtype (HF's per-head q norm)."""
    return x * torch.rsqrt(x.float().square().mean(-1, keepdim=True) + eps).to(x.dtype)


def rope_inv_freq(rope: RopeConfig, rope_dim: int) -> torch.Tensor:
    """Inverse frequencies [rd/2] (fp32) of one rotary table (deepseek_v4.md §5)."""
    base = rope.theta ** (torch.arange(0, rope_dim, 2, dtype=torch.float32) / rope_dim)
    inv = 1.0 / base
    if rope.kind == "default":
        return inv

    # YaRN: interpolate low-frequency pairs by `factor`, keep high-frequency pairs, ramp between.
    def correction_dim(rotations: float) -> float:
        return rope_dim * math.log(rope.original_max_position / (rotations * 2 * math.pi)) / (2 * math.log(rope.theta))

    lo = max(math.floor(correction_dim(rope.beta_fast)), 0)
    hi = min(math.ceil(correction_dim(rope.beta_slow)), rope_dim - 1)
    if lo == hi:
        hi += 0.001  # avoid a zero-width ramp
    ramp = ((torch.arange(rope_dim // 2, dtype=torch.float32) - lo) / (hi - lo)).clamp(0, 1)
    keep = 1 - ramp  # share of the unscaled (extrapolated) frequency
    return (1.0 / (rope.factor * base)) * (1 - keep) + inv * keep


class RotaryTable(nn.Module):
    """cos/sin of one rotary table for given absolute positions (computed on the fly, fp32)."""

    def __init__(self, rope: RopeConfig, rope_dim: int):
        super().__init__()
        self.rope, self.rope_dim = rope, rope_dim
        self.attention_factor = rope.attention_factor
        self.register_buffer("inv_freq", rope_inv_freq(rope, rope_dim), persistent=False)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [...] int → (cos, sin) [..., rd/2] fp32."""
        freqs = positions.float().unsqueeze(-1) * self.inv_freq
        return freqs.cos() * self.attention_factor, freqs.sin() * self.attention_factor


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """Interleaved (GPT-J) rotation of x's trailing rd channels, in fp32, cast back.

    x [..., C] with C ≥ rd; cos/sin [..., rd/2] broadcastable to x's leading dims (insert head
    dims at the call site). Pairs (2i, 2i+1) of the rope slice rotate by φ_i; `inverse` rotates by −φ_i.
    """
    rd = 2 * cos.shape[-1]
    nope, rope = x[..., :-rd], x[..., -rd:].float()
    x0, x1 = rope[..., 0::2], rope[..., 1::2]
    if inverse:
        sin = -sin
    y = torch.stack((x0 * cos - x1 * sin, x1 * cos + x0 * sin), dim=-1).flatten(-2)
    return torch.cat([nope, y.to(x.dtype)], dim=-1)


class GroupedLinear(nn.Module):
    """Block-diagonal projection of G head groups: [..., G, in] → [..., G, out] (weight [G·out, in])."""

    def __init__(self, in_per_group: int, out_total: int, groups: int):
        super().__init__()
        self.groups = groups
        self.weight = nn.Parameter(torch.empty(out_total, in_per_group))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.view(self.groups, -1, self.weight.shape[-1])  # [G, out, in]
        return torch.einsum("...gi,goi->...go", x, w)


def linear(in_features: int, out_features: int) -> nn.Linear:
    """V4 has no Linear biases."""
    return nn.Linear(in_features, out_features, bias=False)


__all__ = ["RMSNorm", "unweighted_rms_norm", "rope_inv_freq", "RotaryTable", "apply_rope", "GroupedLinear",
           "linear"]
