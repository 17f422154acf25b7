"""Run a function on P gloo ranks of this machine and collect what each returns (tests/model/test_parallel.py).

Each rank is a forked process with one thread, a process group over a file store in a fresh directory
and a `Parallel` for it; it returns its result through `torch.save` to a file (tensors, lists, dicts:
what `torch.load(weights_only=True)` reads back). A rank that raises reports its traceback; ranks still
running at the deadline are killed and the call raises, so a collective that hangs fails the test in
bounded time.
"""

from __future__ import annotations

import multiprocessing
import os
import tempfile
import time
import traceback
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

from dspark.config import ModelConfig
from dspark.model.parallel import Parallel


def parallel_config(**overrides) -> ModelConfig:
    """The tiny preset made divisible by 4 ranks: 8 heads in 4 output groups, 16 experts (4 per rank at
    P = 4, 8 at P = 2), a 512-token vocabulary; every layer and router type kept."""
    return ModelConfig.tiny(**{**dict(num_heads=8, o_groups=4, n_routed_experts=16, vocab_size=512), **overrides})


def _rank_main(fn: Callable, rank: int, world: int, root: str, args: tuple) -> None:
    out = Path(root, f"rank{rank}")
    try:
        torch.set_num_threads(1)
        dist.init_process_group("gloo", init_method=f"file://{root}/store", rank=rank, world_size=world)
        try:
            result = fn(Parallel.from_group(), *args)
        finally:
            dist.destroy_process_group()
        torch.save(result, out.with_suffix(".pt"))
    except BaseException:
        out.with_suffix(".err").write_text(traceback.format_exc())
        os._exit(1)


def run_ranks(fn: Callable, world: int, *args, timeout: float = 120.0) -> list:
    """fn(parallel, *args) on `world` ranks → each rank's result, rank order. `fn` and `args` reach the
    ranks by fork (no pickling): a model built here is shared copy-on-write."""
    ctx = multiprocessing.get_context("fork")
    with tempfile.TemporaryDirectory() as root:
        procs = [ctx.Process(target=_rank_main, args=(fn, r, world, root, args), daemon=True) for r in range(world)]
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout
        for p in procs:
            p.join(max(0.0, deadline - time.monotonic()))
        hung = [r for r, p in enumerate(procs) if p.is_alive()]
        for r in hung:
            procs[r].kill()
            procs[r].join()
        errors = [Path(root, f"rank{r}.err") for r in range(world)]
        failed = {r: e.read_text() for r, e in enumerate(errors) if e.exists()}
        if failed:
            raise RuntimeError("ranks failed:\n" + "\n".join(f"rank {r}:\n{t}" for r, t in failed.items()))
        if hung:
            raise TimeoutError(f"ranks {hung} of {world} still running after {timeout} s (a collective hung?)")
        bad = [r for r, p in enumerate(procs) if p.exitcode != 0]
        if bad:
            raise RuntimeError(f"ranks {bad} exited with codes {[procs[r].exitcode for r in bad]}")
        return [torch.load(Path(root, f"rank{r}.pt"), weights_only=True) for r in range(world)]
