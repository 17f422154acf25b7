"""CUDA-graph-captured decode rounds (architecture.md §7): a round's hundreds of small launches
replayed as one graph, so the GPU never waits on the host between kernels.

What makes a round capturable is enforced elsewhere and tested on CPU: the step functions never read
device values (tests/decode/test_sync_free.py), every tensor a round carries to the next is updated in
place (tests/decode/test_graph_safe.py), and the host passes a round's inputs only through the static
buffers here (tests/decode/test_graphs.py, with `emulate=True`).

A graph is keyed by everything that changes the captured work: the flat verify bucket, which sampling
parameters any slot uses (`SlotState.sampling` passes None for a temperature when every slot is greedy
and for filters no slot uses), and the half of the round (whole round, draft + schedule, or verify).
Each key runs eagerly the first time it is met (Triton compiles, libraries initialise, lazily allocated
state appears), is captured the second time and replayed from then on. A verify graph is captured only
over the outputs of the captured draft graph, whose addresses never change. All graphs share one memory
pool.

`emulate=True` (CPU tests) keeps the same bookkeeping without CUDA: "capture" stores the round's
closure, "replay" calls that stored closure again, so a round whose inputs did not go through the
static buffers reads stale values and the tests see it.
"""

from __future__ import annotations

from typing import Callable

import torch

from dspark.decode.step import RoundPlan


class CapturedRounds:
    def __init__(self, max_batch: int, device: torch.device, *, emulate: bool = False):
        device = torch.device(device)
        if not emulate and device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device, got {device}")
        self.emulate = emulate
        # Static round inputs: the host copies each round's values into these.
        self.committed = torch.zeros(max_batch, dtype=torch.long, device=device)
        self.room = torch.zeros(max_batch, dtype=torch.long, device=device)
        self._seen: set = set()
        self._graphs: dict = {}  # key → (graph or stored closure, static outputs)
        self._pool = None if emulate else torch.cuda.graph_pool_handle()
        self.replays = 0  # rounds served from a graph after its capture (tests, stats)

    def plan(self, committed: torch.Tensor, room: torch.Tensor, bucket: int, scheduler, tracker) -> RoundPlan:
        """A RoundPlan over the static buffers, after copying this round's host values into them."""
        self.committed.copy_(committed, non_blocking=True)
        self.room.copy_(room, non_blocking=True)
        return RoundPlan(committed=self.committed, room=self.room, bucket=bucket, scheduler=scheduler, tracker=tracker)

    def run(self, key, fn: Callable[[], object]):
        """fn() runs one round (or half) reading only static or persistent tensors; returns its outputs,
        which stay valid until the next call with the same key."""
        entry = self._graphs.get(key)
        if entry is None:
            if key not in self._seen:
                self._seen.add(key)
                return fn()  # eager: warm-up for this key
            entry = self._graphs[key] = self._capture(fn)  # runs this round once, too
            return entry[1]
        graph, outputs = entry
        self.replays += 1
        if self.emulate:
            fresh = graph()
            _copy_into(outputs, fresh)
        else:
            graph.replay()
        return outputs

    def is_static(self, key, outputs) -> bool:
        """Whether `outputs` are the static outputs of the graph captured for `key` (fixed addresses)."""
        entry = self._graphs.get(key)
        return entry is not None and entry[1] is outputs

    def _capture(self, fn):
        """(graph, static outputs), having run the round once."""
        if self.emulate:
            return fn, _clone(fn())  # a stand-in capture executes; keep its outputs as the static ones
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            outputs = fn()
        graph.replay()  # capture records without running: this round still has to happen
        return graph, outputs


def _clone(tree):
    if isinstance(tree, torch.Tensor):
        return tree.clone()
    if hasattr(tree, "__dataclass_fields__"):
        return type(tree)(**{f: _clone(getattr(tree, f)) for f in tree.__dataclass_fields__})
    return tree


def _copy_into(static, fresh) -> None:
    if isinstance(static, torch.Tensor):
        static.copy_(fresh)
    elif hasattr(static, "__dataclass_fields__"):
        for f in static.__dataclass_fields__:
            _copy_into(getattr(static, f), getattr(fresh, f))
