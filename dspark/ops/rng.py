"""Counter-based uniforms: reproducible per request, no generator state, no host syncs.

uniforms(seed [R], offset [R], n) → [R, n] fp32 in [0, 1): value j of row r is a hash of
(seed[r], offset[r] + j). A request that draws n values per round advances its offset by n, so a
seed reproduces a run exactly, whatever the batch it shares, and a CUDA graph replays it by
updating the offset tensor.
"""

from __future__ import annotations

import torch

_MASK32 = 0xFFFFFFFF


def _mul32(x: torch.Tensor, m: int) -> torch.Tensor:
    """(x · m) mod 2^32 for x < 2^32 without int64 overflow (split x into 16-bit halves)."""
    lo, hi = x & 0xFFFF, x >> 16
    return (lo * m + (((hi * m) & 0xFFFF) << 16)) & _MASK32


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit avalanche hash (the "lowbias32" constants of Chris Wellons' hash prospector)."""
    x = x & _MASK32
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def uniforms(seed: torch.Tensor, offset: torch.Tensor, n: int) -> torch.Tensor:
    counter = offset.long().unsqueeze(-1) + torch.arange(n, device=offset.device)  # [R, n]
    key = _hash32(seed.long() & _MASK32)
    # Two rounds mixing the seed and both halves of the 64-bit counter.
    x = _hash32(key.unsqueeze(-1) ^ (counter & _MASK32))
    x = _hash32(x ^ _hash32((counter >> 32) + 0x9E3779B9))
    return (x >> 8).float() * (1.0 / (1 << 24))
