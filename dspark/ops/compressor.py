"""Window pooling of the V4 KV compressors (HCA, CSA and the indexer's own compressor).

Layouts: `...` leading dims (batch, windows), P pooled slots (m for HCA, 2m for CSA), C channels.

    kv    [..., P, C]   raw kv projections of the slots (model dtype)
    gate  [..., P, C]   gate projections + position bias (fp32); −inf marks an empty slot
    out   [..., C]      Σ_p softmax_p(gate)[p, c] · kv[p, c], softmax over slots per channel, fp32

Every window has at least one finite slot, so the softmax is always defined.
"""

from __future__ import annotations

import torch


def compress_windows_ref(kv: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    weights = torch.softmax(gate.float(), dim=-2)
    return (weights * kv.float()).sum(dim=-2)


# TODO(#7): Triton kernel (window pooling fused with kv_norm and RoPE).
compress_windows = compress_windows_ref
