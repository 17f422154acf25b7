"""The DeepSeek-V4 target model (HF transformers 5.24 semantics, deepseek_v4.md).

Module and parameter names equal HF's in-memory `DeepseekV4ForCausalLM` names, so an HF
`state_dict` loads 1:1; upstream names and quantised releases go through `dspark.checkpoint.v4`.
The dense `forward` here runs full sequences without a cache: it is the specification every
cached / ragged path is tested against.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from dspark.config import ModelConfig
from dspark.model.batch import Batch, StepIndex
from dspark.model.cache import TargetCache
from dspark.model.decoder import (DecoderLayer, cached_attend, cast_keeping_fp32_islands, dense_attend, randomize_,
                                  reset_rotary_buffers)
from dspark.model.layers import RMSNorm, linear
from dspark.model.mhc import HyperHead
from dspark.model.mtp import MTPBlock
from dspark.model.parallel import Parallel
from dspark.model.protocol import TargetOutput, check_input_ids

class Backbone(nn.Module):
    """HF's `model.*` namespace: embeddings, decoder layers, final collapse and norm."""

    def __init__(self, config: ModelConfig, parallel: Parallel = Parallel.single()):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)  # replicated
        self.layers = nn.ModuleList(
            DecoderLayer(config, lt, mt, parallel) for lt, mt in zip(config.layer_types, config.mlp_layer_types))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.hc_head = HyperHead(config)


class DeepseekV4(nn.Module):
    """DeepSeek-V4 causal LM (+ its MTP module when the checkpoint has one).

    `parallel` shards it over a torch.distributed group (dspark.model.parallel: heads, o-groups, experts,
    LM-head rows); every rank then runs the same forwards on the same inputs and gets the same full logits."""

    def __init__(self, config: ModelConfig, parallel: Parallel = Parallel.single()):
        super().__init__()
        parallel.check(config)
        self.config, self.parallel = config, parallel
        self.model = Backbone(config, parallel)
        self.lm_head = linear(config.hidden_size, parallel.part(config.vocab_size, "vocab_size"))
        if config.mtp_kind == "mtp":
            self.mtp = nn.ModuleList(MTPBlock(config, parallel) for _ in range(config.num_mtp_layers))

    # ---------------------------------------------------------------- construction
    @classmethod
    def empty(cls, config: ModelConfig, *, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
              parallel: Parallel = Parallel.single()) -> "DeepseekV4":
        """Uninitialised weights (this rank's shard with `parallel`) allocated once on `device` in `dtype`
        (fp32 islands stay fp32).

        Built on the meta device first, so no fp32 copy of a large model ever exists.
        """
        with torch.device("meta"):
            model = cls(config, parallel)
        model.to_dtype(dtype)
        model.to_empty(device=device)
        model.reset_buffers()
        return model

    @classmethod
    def random(cls, config: ModelConfig, *, seed: int = 0, dtype: torch.dtype = torch.float32,
               device: torch.device | str = "cpu") -> "DeepseekV4":
        """Random weights in which every parameter and buffer is non-trivial (deepseek_v4.md §14.1)."""
        model = cls.empty(config, dtype=torch.float32, device=device)
        randomize_(model, torch.Generator(device="cpu").manual_seed(seed))
        return model.to_dtype(dtype)

    @classmethod
    def from_pretrained(cls, path: str | Path, *, dtype: torch.dtype = torch.float32,
                        device: torch.device | str = "cpu", num_layers: int | None = None,
                        kernels: str = "auto", parallel: Parallel = Parallel.single()) -> "DeepseekV4":
        """Load an HF-named, upstream-named or sharded FP8/FP4 checkpoint directory: the README's entry
        point, a facade over `dspark.checkpoint.load_target` (the one import against the package order,
        allowed by name in tests/test_imports.py)."""
        from dspark.checkpoint import load_target

        return load_target(path, dtype=dtype, device=device, num_layers=num_layers, kernels=kernels,
                           parallel=parallel)

    def new_cache(self, *, max_batch: int, max_seq_len: int, max_provisional: int = 1, page_size: int | None = None,
                  memory_budget: int | None = None, with_mtp: bool = False) -> TargetCache:
        """The paged cache `forward_batch` reads and writes (sliding rings, compressed entries,
        indexer keys; the MTP window ring with `with_mtp`), on the model's device and in its dtype."""
        return TargetCache(self.config, max_batch=max_batch, max_seq_len=max_seq_len, max_provisional=max_provisional,
                           page_size=page_size, memory_budget=memory_budget, dtype=self.dtype,
                           device=self.lm_head.weight.device, with_mtp=with_mtp)

    def to_dtype(self, dtype: torch.dtype) -> "DeepseekV4":
        """Cast floating parameters to `dtype`, keeping the fp32 islands (never use `.to(bf16)`)."""
        return cast_keeping_fp32_islands(self, dtype)

    def reset_buffers(self) -> None:
        """Recompute the non-persistent buffers (rotary tables) after `to_empty`."""
        reset_rotary_buffers(self)

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    @property
    def has_mtp(self) -> bool:
        """Whether an MTP module was built (the checkpoint's `mtp.*` holds one)."""
        return self.config.mtp_kind == "mtp"

    # ---------------------------------------------------------------- dense forward
    def check_input_ids(self, input_ids: torch.Tensor) -> None:
        """API-boundary validation (host sync): shape, dtype, vocabulary range, length."""
        check_input_ids(self.config, input_ids)

    def run(self, input_ids: torch.Tensor, tap_layers: tuple[int, ...] = (), *, collect: list | None = None,
            expert_load: torch.Tensor | None = None) -> TargetOutput:
        """Full sequences from position 0, no cache. input_ids [B, S] → TargetOutput.

        Training extras: `collect` receives each CSA layer's `IndexerTargets`; `expert_load`
        [layers, E] counts expert assignments (for the bias balancing)."""
        self.check_input_ids(input_ids)
        for layer in tap_layers:
            if not 0 <= layer < self.config.num_layers:
                raise ValueError(f"tap layer {layer} outside 0..{self.config.num_layers - 1}")
        embed = self.model.embed_tokens(input_ids)  # [B, S, D]
        streams = embed.unsqueeze(-2).expand(*embed.shape[:-1], self.config.hc_mult, -1).contiguous()
        taps = {}
        attend = dense_attend if collect is None else (lambda attn, x: attn(x, collect))
        for i, layer in enumerate(self.model.layers):
            load = None if expert_load is None else expert_load[i]
            streams = layer(streams, input_ids, attend, None, load)
            if i in tap_layers:
                taps[i] = streams.float().mean(dim=-2).to(streams.dtype)
        return TargetOutput(self.logits(streams), streams, taps)

    def logits(self, streams: torch.Tensor) -> torch.Tensor:
        """Last-layer streams [..., N, D] → fp32 logits [..., V]."""
        return self.head(self.model.norm(self.model.hc_head(streams)))

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """Normed hidden [..., D] → fp32 logits [..., V] over the whole vocabulary (the LM head shared
        by the MTP); with parallelism each rank's vocabulary rows, gathered onto every rank."""
        return self.parallel.concat(torch.nn.functional.linear(h.float(), self.lm_head.weight.float()))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids [B, S] (positions 0..S−1, no cache) → fp32 logits [B, S, V]."""
        return self.run(input_ids).logits

    # ---------------------------------------------------------------- cached ragged forward
    def forward_batch(self, batch: Batch, cache: TargetCache, tap_layers: tuple[int, ...] = (),
                      expert_load: torch.Tensor | None = None) -> TargetOutput:
        """One forward over a flat ragged batch, extending `cache` (architecture.md §2).

        Returns fp32 logits [L, V] for `batch.logits_rows`, the last layer's streams [T, N, D] (the
        MTP's input) and the tapped layers' stream means [T, D]. Preconditions (documented, not
        checked: no host syncs here): ids in the vocabulary, each row's positions are cache_len,
        cache_len+1, ..., its slot admitted with room for them. `expert_load` [layers, E] counts
        expert assignments per layer when given.
        """
        idx = StepIndex(batch)
        embed = self.model.embed_tokens(batch.input_ids)  # [T, D]
        streams = embed.unsqueeze(-2).expand(*embed.shape[:-1], self.config.hc_mult, -1).contiguous()
        taps = {}
        for i, layer in enumerate(self.model.layers):
            attend = cached_attend(idx, cache.layers[i], cache.block_table, cache.dummy_slot)
            load = None if expert_load is None else expert_load[i]
            streams = layer(streams, batch.input_ids, attend, batch.valid, load)
            if i in tap_layers:
                taps[i] = streams.float().mean(dim=-2).to(streams.dtype)
        return TargetOutput(self.logits(streams[batch.logits_rows]), streams, taps)
