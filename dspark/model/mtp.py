"""V4's multi-token-prediction module (upstream `mtp.{k}.*`; HF drops it, deepseek_v4.md §12.2).

For position t it predicts token t+2 from the main model's last-layer streams H_t (before hc_head
and norm) and the embedding of token t+1:

    Y = e_proj(enorm(embed(x_{t+1})))  broadcast over N  +  h_proj(hnorm(H_t))   per stream
    Y = V4 block(Y)        sliding-window attention only (main rope), score-routed MoE, own KV window
    logits = lm_head(norm(hc_head(Y)))

Embedding and LM head are the target's. For chained drafting the output streams Y feed the next
step as H.
"""

from __future__ import annotations

import torch

from dspark.config import ModelConfig
from dspark.model.layers import RMSNorm, linear
from dspark.model.mhc import HyperHead
from dspark.model.parallel import Parallel
from dspark.model.batch import Batch, StepIndex
from dspark.model.cache import TargetCache
from dspark.model.decoder import AttendFn, DecoderLayer, cached_attend, dense_attend


class MTPBlock(DecoderLayer):
    def __init__(self, config: ModelConfig, parallel: Parallel = Parallel.single()):
        super().__init__(config, layer_type="sliding", mlp_type="score", parallel=parallel)
        self.enorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.hnorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.e_proj = linear(config.hidden_size, config.hidden_size)
        self.h_proj = linear(config.hidden_size, config.hidden_size)
        self.hc_head = HyperHead(config)
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def streams(self, hidden_streams: torch.Tensor, next_embed: torch.Tensor, next_ids: torch.Tensor,
                attend: AttendFn = dense_attend, valid: torch.Tensor | None = None) -> torch.Tensor:
        """hidden_streams [..., N, D] (H_t), next_embed [..., D] (embed(x_{t+1})) → output streams Y."""
        y = self.e_proj(self.enorm(next_embed)).unsqueeze(-2) + self.h_proj(self.hnorm(hidden_streams))
        return super().forward(y, next_ids, attend, valid)

    def hidden(self, out_streams: torch.Tensor) -> torch.Tensor:
        """Output streams → the normed hidden state the shared LM head reads [..., D]."""
        return self.norm(self.hc_head(out_streams))


def mtp_forward(target, hidden_streams: torch.Tensor, next_ids: torch.Tensor, depth: int = 0):
    """Dense MTP pass over full sequences (positions 0..S−1) with the target's embedding and head.

    hidden_streams [B, S, N, D], next_ids [B, S] (token t+1 at row t) → (fp32 logits [B, S, V], Y).
    """
    block: MTPBlock = target.mtp[depth]
    out = block.streams(hidden_streams, target.model.embed_tokens(next_ids), next_ids)
    return target.head(block.hidden(out)), out


def mtp_forward_batch(target, hidden_streams: torch.Tensor, batch: Batch, cache: TargetCache, depth: int = 0):
    """Cached MTP pass over a flat ragged batch: row i pairs H at batch.positions[i] with
    batch.input_ids[i] = the NEXT token; the MTP's own window ring in `cache.mtp[depth]` follows the
    same commit/rollback rule as the target's. → (fp32 logits [L, V] at logits_rows, Y [T, N, D])."""
    block: MTPBlock = target.mtp[depth]
    attend = cached_attend(StepIndex(batch), cache.mtp[depth], cache.block_table, cache.dummy_slot)
    out = block.streams(hidden_streams, target.model.embed_tokens(batch.input_ids), batch.input_ids, attend,
                        batch.valid)
    return target.head(block.hidden(out[batch.logits_rows])), out
