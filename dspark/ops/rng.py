"""Counter-based uniforms: reproducible per request, no generator state, no host syncs.

uniforms(seed [R], offset [R], n) → [R, n] fp32 in [0, 1): value j of row r is a hash of
(seed[r], offset[r] + j), all 64 bits of each (seeds that differ only in their high 32 bits give
different streams; a seed below 2^32 gives the same stream as before the high bits were mixed in).
A request that draws n values per round advances its offset by n, so its draws never depend on
its batch mates, and a CUDA graph replays them by updating the offset tensor.

What a seed reproduces (the engine's contract): the same request with the same seed emits the same
tokens whatever batch it shares under the `fixed`, `threshold-slot` and `threshold-survival`
schedulers without `adapt` (each round's verify length depends on the request alone). Under
`hardware` and `async`, and with `adapt` (whose priors are shared per sampling configuration), a
round's verify length depends on the other requests, so at temperature > 0 a seeded request's
tokens may differ between batches; each run's output distribution is the target's all the same.
Greedy requests emit the same tokens under every scheduler.
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
    seed = seed.long()
    key = _hash32(seed & _MASK32)
    high = _hash32((seed >> 32) & _MASK32).unsqueeze(-1)  # 0 for seeds below 2^32 (_hash32(0) = 0)
    # Two rounds mixing both halves of the seed and of the 64-bit counter.
    x = _hash32(key.unsqueeze(-1) ^ (counter & _MASK32))
    x = _hash32(x ^ _hash32((counter >> 32) + 0x9E3779B9) ^ high)
    return (x >> 8).float() * (1.0 / (1 << 24))
