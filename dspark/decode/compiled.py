"""Decode rounds compiled by `torch.compile` (inductor's C++ backend) on CPU: a round's hundreds of
small ops and the Python around them become a few generated C++ loops, which is what a CPU decode
step is made of (per-op dispatch and Python, not arithmetic).

Rounds are keyed exactly like the CUDA-graph keys (dspark/decode/graphs.py): the verify bucket, which
sampling parameters any slot uses, the context bound and the half of the round. Shapes are static
(`dynamic=False`), so each key is one compiled graph. A key runs eagerly the first time it is met
(lazily allocated drafter state appears, and a key met once is not worth compiling) and compiled from
the second time on. Prefill chunks stay eager: their length is the prompt's, a new shape per prompt.

Dynamo keeps its compiled graphs per code object and falls back to eager when one collects more than
`recompile_limit` of them: every call here raises that limit to cover the keys and turns the
fallback into an error, and `compiles` counts the graphs built, so a recompile storm is seen, not
silently slow.

Artifacts persist across processes in inductor's FX-graph and AOT caches, under
$TORCHINDUCTOR_CACHE_DIR (default /tmp/torchinductor_<user>): a key compiled once on this machine is
loaded, not rebuilt, by the next run (tracing still runs).

Why it is off by default (EngineConfig.compile=False), measured on the 2-core development machine
shared with other jobs: a nano `ar` round compiles cold in 3.5-6 minutes (≈ 100 generated C++
kernels at 1-2 s each of inductor codegen and g++), and loads warm in 5-20 s per key; the README's
main command (32 tokens) takes about 2 s eagerly, so compiling never pays there, cold or warm. Once
compiled, rounds run far faster (tools/bench_cpu.py --compile, 1 thread: `ar` 2.3× HF generate's
tokens/s at batch 1 where eager is 0.67×; 1.1× at batch 8 where eager is 0.53×). `compile=None`
turns it on wherever it can run.
"""

from __future__ import annotations

import functools
import logging
import shutil
from typing import Callable

import torch

log = logging.getLogger(__name__)

# Graphs one code object may hold: far more keys than a run meets (buckets × sampling modes × context
# bounds); past it Dynamo raises instead of running eagerly.
MAX_GRAPHS_PER_FUNCTION = 512


@functools.lru_cache(maxsize=None)
def cpp_compiler() -> str | None:
    """The C++ compiler inductor would call (its `cpp.cxx` setting), if it is on PATH."""
    import torch._inductor.config as inductor_config

    names = [inductor_config.cpp.cxx] if isinstance(inductor_config.cpp.cxx, str) else list(inductor_config.cpp.cxx)
    return next((path for path in map(shutil.which, filter(None, names)) if path), None)


def eager_reason(requested: bool | None, device: torch.device, kernels: str) -> str | None:
    """Why rounds cannot be compiled here (None: they can). `requested` is EngineConfig.compile."""
    if requested is False:
        return "compile=False"
    if device.type != "cpu":
        return f"the device is {device.type}, and compiled rounds are for CPU (CUDA graphs serve GPUs)"
    if kernels == "triton":
        return "the target runs the Triton kernels (kernels='triton'), which inductor's CPU backend cannot compile"
    if cpp_compiler() is None:
        return "no C++ compiler was found for inductor"
    return None


def use_compiled_rounds(requested: bool | None, device, kernels: str) -> bool:
    """Resolve EngineConfig.compile: True refuses an impossible setup, None (auto) falls back to eager
    and says why once per process."""
    reason = eager_reason(requested, torch.device(device), kernels)
    if reason is None:
        return True
    if requested:
        raise ValueError(f"compile=True, but {reason}")
    if requested is None:
        _say_eager(reason)
    return False


@functools.lru_cache(maxsize=None)
def _say_eager(reason: str) -> None:
    log.warning("dspark: decode rounds run eagerly: %s", reason)


class CompiledRounds:
    """One compiled graph per round key; `run(key, fn, *args)` runs `fn(*args)`, compiled from the
    key's second meeting on. `fn` must be a module-level function: its code object holds the graphs,
    shared by every engine of the process (a second engine on the same model compiles nothing)."""

    def __init__(self):
        self._seen: set = set()
        self.compiles = 0  # graphs inductor built (or loaded from its cache) during this engine's rounds
        self.compiled_keys: set = set()  # keys that ran compiled at least once

    def run(self, key, fn: Callable, *args):
        if key not in self._seen:
            self._seen.add(key)
            return fn(*args)
        self.compiled_keys.add(key)
        before = _graphs_built[0]
        with torch._dynamo.config.patch(recompile_limit=MAX_GRAPHS_PER_FUNCTION,
                                        accumulated_recompile_limit=MAX_GRAPHS_PER_FUNCTION,
                                        fail_on_recompile_limit_hit=True):
            result = _compiled(fn)(*args)
        self.compiles += _graphs_built[0] - before
        return result


# Process-wide, like Dynamo's own graph cache: one backend (Dynamo matches cached graphs to the
# backend object) and one compiled wrapper per round function.
_graphs_built = [0]


def _inductor(graph, example_inputs):
    from torch._inductor.compile_fx import compile_fx

    _graphs_built[0] += 1
    return compile_fx(graph, example_inputs)


@functools.lru_cache(maxsize=None)
def _compiled(fn: Callable) -> Callable:
    return torch.compile(fn, backend=_inductor, fullgraph=True, dynamic=False)
