"""The Target protocol: what the engine, the drafters and the trainers ask of a target model.
`DeepseekV4` implements it; a second family (dense HF models) implements the same surface.

    config                          the model's frozen config (vocab_size, num_layers,
                                    max_position_embeddings, eos_token_ids, kernels, ...)
    dtype, has_mtp                  weight dtype; whether an MTP module is loaded
    forward(input_ids [B, S])       → logits [B, S, V] fp32, dense, no cache
    run(input_ids, tap_layers)      → TargetOutput(logits, streams, taps): the dense forward with the
                                    features drafters read (taps: per layer, [B, S, D])
    new_cache(max_batch=, max_seq_len=, max_provisional=, page_size=, memory_budget=, with_mtp=)
                                    → the paged cache `forward_batch` reads and writes
    forward_batch(batch, cache, tap_layers)
                                    → TargetOutput over a flat ragged batch (dspark.model.batch), rows
                                    at `batch.logits_rows`; writes the batch's K/V into the cache
    check_input_ids(input_ids)      raises ValueError for ids outside the vocabulary
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch

from dspark.model.batch import Batch
from dspark.model.cache import TargetCache
from dspark.model.target import TargetOutput


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
                  memory_budget: int | None = None, with_mtp: bool = False) -> TargetCache: ...

    def forward_batch(self, batch: Batch, cache: TargetCache, tap_layers: tuple[int, ...] = ()) -> TargetOutput: ...

    def check_input_ids(self, input_ids: torch.Tensor) -> None: ...
