"""Tensor and expert parallelism of the V4 target over one `torch.distributed` group (issue 18).

Who owns what, for `world` ranks (P), rank r:

    attention   q_b_proj rows, sinks: heads [r·H/P, (r+1)·H/P); o_a_proj rows: groups [r·G/P, (r+1)·G/P)
                (exactly those heads' groups); o_b_proj columns: the same groups' o_lora slices →
                a partial [T, D] per rank, summed across ranks. q_a_proj, the shared K=V latent
                (V4 has one KV head), compressor and indexer are replicated: every rank needs them whole.
    MoE         routed experts [r·E/P, (r+1)·E/P); shared expert intermediate [r·I/P, (r+1)·I/P); the
                router is replicated, so every rank routes every token identically, runs its own experts
                on the tokens routed there and its shared-expert slice → one partial [T, D], summed.
    LM head     vocabulary rows [r·V/P, (r+1)·V/P); the fp32 logits are all-gathered, so every rank holds
                the same full [L, V] logits: sampling (counter-based uniforms, ops.rng), rejection and
                scheduling then decide identically on every rank by construction, with no broadcast.
                Cost: L·V·4 bytes received per forward per rank (V4-Flash, V = 129280: 0.5 MB per row).
    replicated  embedding, mHC, norms, routers, MTP projections, caches (latent KV: one head).

Every sharded tensor is an even contiguous split of one dimension of its full tensor, so the shard dim
of a parameter is simply the one where its local shape differs from the full model's (`shard_dims`);
the loader and the tests use that rule, no name list.

Combine (`Parallel.sum`): every rank's partial [T, D] is added in rank order, either after one all-gather
(small T) or as a reduce-scatter built from an all-to-all plus an all-gather of the summed chunks (large T,
a ring all-reduce's bytes); both give the same bits. Not a library all-reduce: a ring or tree all-reduce
does not promise that its summation order is independent of the message size (chunking) and algorithm
choice, which batch invariance (architecture.md §9) needs; in rank order the result is a fixed formula,
bit-identical on every rank. This is the all-gather / reduce-scatter family: the router is replicated,
every rank computes its experts for all tokens routed to them and nothing is permuted. An all-to-all
token dispatch would send each token only to the ranks of its K experts (K·D instead of a whole [T, D]
partial per rank) and skip the masked work; it pays off at large T and P (prefill, P ≥ 8, E = 256 with
K = 6) and needs a capacity plan to stay sync-free. TODO(#18): all-to-all dispatch for prefill at scale.

`Parallel.single()` is one process: every collective is the identity and no shape changes, so the
single-process model is exactly today's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


# torch ≥ 2.13 renames all_gather_into_tensor (deprecated there); pyproject allows torch ≥ 2.5.
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


# From this many elements on, `Parallel.sum` reduce-scatters instead of gathering every part. Measured with gloo
# on 2 CPU cores, [T, 4096] fp32 (ms per sum, gather / reduce-scatter / library all_reduce): world 2 T = 8
# 1.8 / 2.0 / 0.5, T = 64 6.3 / 3.6 / 2.7, T = 512 51 / 40 / 24; world 4 (oversubscribed) T = 64 14 / 20 / 15,
# T = 512 286 / 44 / 35. TODO(#18): recalibrate with NCCL on GPUs.
SCATTER_MIN_ELEMENTS = 64 * 4096


@dataclass(frozen=True)
class Parallel:
    """One process group used for both tensor (attention, LM head) and expert (MoE) parallelism."""

    rank: int = 0
    world: int = 1
    group: dist.ProcessGroup | None = None  # None with world 1; else the group every collective runs over

    @classmethod
    def single(cls) -> "Parallel":
        return cls()

    @classmethod
    def from_group(cls, group: dist.ProcessGroup | None = None) -> "Parallel":
        """The current process's place in `group` (the default group when None; it must be initialised)."""
        if not dist.is_initialized():
            raise RuntimeError("torch.distributed is not initialised: call init_process_group first")
        return cls(rank=dist.get_rank(group), world=dist.get_world_size(group), group=group)

    def part(self, total: int, name: str) -> int:
        """This rank's share of `total` items named `name`; refuses a world size that does not divide it."""
        if total % self.world:
            raise ValueError(f"{name} {total} is not divisible by the parallel world size {self.world}")
        return total // self.world

    def check(self, config) -> None:
        """Every sharded dimension of a V4 `ModelConfig` divides evenly (named when it does not)."""
        for name in ("num_heads", "o_groups", "n_routed_experts", "moe_intermediate_size", "vocab_size"):
            self.part(getattr(config, name), name)

    # ---------------------------------------------------------------- collectives
    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """x [...] on every rank → [P, ...], rank order (the identity's unsqueeze with one process)."""
        if self.world == 1:
            return x.unsqueeze(0)
        flat = x.reshape(-1)  # gloo gathers along dim 0 only: [P·n], viewed [P, ...] after
        out = torch.empty(self.world * flat.numel(), dtype=x.dtype, device=x.device)
        _all_gather(out, flat, group=self.group)
        return out.view(self.world, *x.shape)

    def sum(self, partial: torch.Tensor) -> torch.Tensor:
        """Σ over ranks of `partial`, added in rank order: bit-identical on every rank (module docstring).

        Small tensors: one all-gather, every rank adds all P parts. Large ones: a reduce-scatter made of
        an all-to-all (rank r receives every rank's r-th chunk and adds them in rank order), then an
        all-gather of the summed chunks, i.e. a ring all-reduce's 2(P−1)/P bytes. Both add each element's
        P parts in the same order, so the switch (on static sizes) never changes a bit."""
        if self.world == 1:
            return partial
        if partial.numel() < SCATTER_MIN_ELEMENTS:
            return _ordered_sum(self.gather(partial))
        flat = partial.reshape(-1)
        chunk = -(-flat.numel() // self.world)
        padded = torch.nn.functional.pad(flat, (0, chunk * self.world - flat.numel()))
        mine = torch.empty_like(padded)  # [P·chunk]: row j = rank j's chunk of this rank's share
        dist.all_to_all_single(mine, padded, group=self.group)
        total = self.gather(_ordered_sum(mine.view(self.world, chunk)))  # [P, chunk]
        return total.reshape(-1)[: flat.numel()].view_as(partial)

    def concat(self, x: torch.Tensor) -> torch.Tensor:
        """[..., n] on every rank → [..., P·n], rank r's block at [r·n, (r+1)·n) (the vocabulary gather)."""
        if self.world == 1:
            return x
        return torch.cat(self.gather(x).unbind(0), dim=-1)


def _ordered_sum(parts: torch.Tensor) -> torch.Tensor:
    """[P, ...] → parts[0] + parts[1] + ... in that order (never a reduction kernel's own order)."""
    out = parts[0]
    for r in range(1, parts.shape[0]):
        out = out + parts[r]
    return out


def shard_dims(full: dict[str, torch.Size], local: dict[str, torch.Size], world: int) -> dict[str, int | None]:
    """Per tensor name: the dimension split across ranks (None = replicated), read off the full and the
    local model's shapes. Refuses names missing on one side and shapes that are not a P-way split of one dim."""
    if set(full) != set(local):
        raise ValueError(f"full and local models differ in tensors: {sorted(set(full) ^ set(local))[:8]}")
    dims: dict[str, int | None] = {}
    for name, shape in full.items():
        mine = local[name]
        diff = [d for d, (a, b) in enumerate(zip(shape, mine)) if a != b]
        if len(shape) != len(mine) or len(diff) > 1 or (diff and shape[diff[0]] != world * mine[diff[0]]):
            raise ValueError(f"{name}: local shape {tuple(mine)} is not a {world}-way split of {tuple(shape)}")
        dims[name] = diff[0] if diff else None
    return dims


def shard(tensor: torch.Tensor, dim: int | None, parallel: Parallel) -> torch.Tensor:
    """Rank `parallel.rank`'s block of `tensor` along `dim` (the tensor itself when replicated)."""
    if dim is None:
        return tensor
    n = parallel.part(tensor.shape[dim], f"dimension {dim} of a {tuple(tensor.shape)} tensor")
    return tensor.narrow(dim, parallel.rank * n, n)


def module_shapes(module: nn.Module) -> dict[str, torch.Size]:
    """Every persistent parameter and buffer of `module` by state-dict name → its shape."""
    return {name: t.shape for name, t in module.state_dict(keep_vars=True).items()}


@torch.no_grad()
def copy_shard_(local: nn.Module, full: nn.Module, parallel: Parallel) -> nn.Module:
    """Fill `local` (built with `parallel`) with this rank's blocks of the single-process `full` model."""
    full_state = full.state_dict()
    dims = shard_dims({k: v.shape for k, v in full_state.items()}, module_shapes(local), parallel.world)
    for name, t in local.state_dict(keep_vars=True).items():
        t.copy_(shard(full_state[name], dims[name], parallel))
    return local


__all__ = ["Parallel", "copy_shard_", "module_shapes", "shard", "shard_dims"]
