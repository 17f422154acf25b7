"""The Target protocol: what the engine, the drafters and the trainers ask of a target model.
`DeepseekV4` implements it, and so does `DenseTarget` (Qwen3, Llama-3, Gemma 4 text).

    config                          the model's frozen config (vocab_size, num_layers,
                                    max_position_embeddings, eos_token_ids, kernels, ...)
    dtype, has_mtp                  weight dtype; whether an MTP module is loaded
    forward(input_ids [B, S])       → logits [B, S, V] fp32, dense, no cache
    run(input_ids, tap_layers)      → TargetOutput(logits, streams, taps): the dense forward with the
                                    features drafters read (taps: per layer, [B, S, D])
    new_cache(max_batch=, max_seq_len=, max_provisional=, page_size=, memory_budget=, with_mtp=)
                                    → the paged cache `forward_batch` reads and writes (a PagedCache:
                                    admit / release / pages_for / free_pages / num_pages / block_table /
                                    dummy_slot / max_batch / device / mtp)
    forward_batch(batch, cache, tap_layers)
                                    → TargetOutput over a flat ragged batch (dspark.model.batch), rows
                                    at `batch.logits_rows`; writes the batch's K/V into the cache
    check_input_ids(input_ids)      raises ValueError for ids outside the vocabulary
"""

from __future__ import annotations

from typing import NamedTuple, Protocol, runtime_checkable

import torch

from dspark.model.batch import Batch
from dspark.model.cache import PagedCache


class TargetOutput(NamedTuple):
    logits: torch.Tensor  # [B, S, V] fp32
    streams: torch.Tensor  # [B, S, N, D] last layer's output streams, before hc_head / norm (V4's MTP input; dense: N = 1)
    taps: dict[int, torch.Tensor]  # layer index → that layer's output [B, S, D] (V4: the mean over its N streams)


@runtime_checkable
class Target(Protocol):
    config: object

    @property
    def dtype(self) -> torch.dtype: ...

    @property
    def has_mtp(self) -> bool: ...

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor: ...

    def run(self, input_ids: torch.Tensor, tap_layers: tuple[int, ...] = ()) -> TargetOutput: ...

    def new_cache(self, *, max_batch: int, max_seq_len: int, max_provisional: int = 1, page_size: int | None = None,
                  memory_budget: int | None = None, with_mtp: bool = False) -> PagedCache: ...

    def forward_batch(self, batch: Batch, cache: PagedCache, tap_layers: tuple[int, ...] = ()) -> TargetOutput: ...

    def check_input_ids(self, input_ids: torch.Tensor) -> None: ...


def check_input_ids(config, input_ids: torch.Tensor) -> None:
    """API-boundary validation of a target's dense input (host sync): a [B, S] int tensor, S within
    `config.max_position_embeddings`, every id in [0, config.vocab_size)."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        raise ValueError(f"input_ids must be a [B, S] tensor, got {getattr(input_ids, 'shape', type(input_ids))}")
    if input_ids.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"input_ids must be int64 or int32, got {input_ids.dtype}")
    if input_ids.shape[1] == 0:
        raise ValueError("input_ids is empty (sequence length 0)")
    if input_ids.shape[1] > config.max_position_embeddings:
        raise ValueError(f"sequence length {input_ids.shape[1]} exceeds max_position_embeddings "
                         f"{config.max_position_embeddings}")
    if torch.compiler.is_compiling():  # the value check reads the ids back to the host: eager only
        return
    lo, hi = int(input_ids.min()), int(input_ids.max())
    if lo < 0 or hi >= config.vocab_size:
        bad = lo if lo < 0 else hi
        raise ValueError(f"token id {bad} outside the vocabulary [0, {config.vocab_size})")
