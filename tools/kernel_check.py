"""Compile every Triton kernel for Hopper (sm_90) and Ampere (sm_80) without a GPU, and read its resources.

    python tools/kernel_check.py                       # default tier: each kernel once per arch, V4-Flash decode
                                                       # (paged attention: Qwen3-8B and Gemma-style decode)
    python tools/kernel_check.py --tier full --out bench/results/kernels-sm90   # every config and shape
    python tools/kernel_check.py --controls            # negative controls: each gate must fire

How: the public ops run with kernels="triton" on fake CUDA tensors (FakeTensorMode, no memory, no device), so
each launcher takes its CUDA path (`x.is_cuda` switches) and builds its grid and arguments at the real shapes;
`launch` is swapped for a recorder. Each recorded launch is bound with Triton's own binder (1 and multiples
of 16 specialise as on a device; pointers count as 16-byte aligned), compiled to cubin for an explicit
`GPUTarget` (the wheel's ptxas, no driver) and read back: registers and spills from the ptxas log, shared
memory, warps and stages from the metadata. From those: blocks per SM (registers, shared memory, warps),
waves over the SMs of an H100 (132, sm_90) or an A100 (108, sm_80), and the bytes the op must move with
their floor at spec bandwidth (H100 3.35 TB/s, H200 4.8 TB/s).

Gates (exit status 1): a compile error, shared memory over the arch's per-block limit, spills over 256 B
per thread, a grid beyond CUDA's limits. Waves below one at decode shapes are reported, not gated;
`LOW_FILL_REASONS` says why each such kernel is left so.

Numbers depend on the Triton version (each bundles its own ptxas); the table records it.
"""

from __future__ import annotations

import os

if __name__ == "__main__":
    # Kernels must be JIT functions, not interpreter objects (tests/conftest.py sets the interpreter), and
    # every launch must reach ptxas, cache or not. Set before anything imports triton.
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ["TRITON_ALWAYS_COMPILE"] = "1"
    os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # 3.9 warns when unset; 1 is its default

import argparse
import contextlib
import dataclasses
import importlib
import importlib.util
import io
import json
import re
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

# ----------------------------------------------------------------------------------------------------
# Hardware: per-arch limits (CUDA occupancy calculator values) and the machines the floors are for.

ARCHS = {
    # shared: per-block opt-in maximum; sm_shared: per SM; 1 KB per block is reserved by the runtime.
    90: dict(name="sm_90", sms=132, shared=232448, sm_shared=233472, regs=65536, warps=64, blocks=32),
    80: dict(name="sm_80", sms=108, shared=166912, sm_shared=167936, regs=65536, warps=64, blocks=32),
}
BANDWIDTH = {"H100": 3.35e12, "H200": 4.8e12}  # spec HBM bytes/s
SPILL_LIMIT = 256  # bytes per thread
GRID_LIMITS = (2 ** 31 - 1, 65535, 65535)

# Kernels that stay under one wave at V4-Flash decode shapes, and why that is right (issue #19).
LOW_FILL_REASONS = {
    "_sparse_sink_attention_kernel": "split at T ≤ 4: T × 2 head blocks × 20 tiles (T = 1: 40 programs); "
                                     "S = 640 slots is 20 tiles of 32, and each tile's partial already moves "
                                     "8× its key bytes (32 heads × 512 fp32 = 64 KB written and read vs 32 KB "
                                     "of keys); fused from T = 5 (10+ programs reading 0.66 MB each)",
    "_sparse_sink_combine_kernel": "one program per (query, head block) merges ≤ 20 partials from L2",
    "_fp8_linear_kernel": "N/BLOCK_N = 64 column blocks over a 4096×4096 FP8 weight (16 MB) at T ≤ 16; not "
                          "wired into the model yet (TODO(#18)); a decode BLOCK_N of 32 would give 128",
    "_fp4_experts_kernel": "as the MoE gate-up: per-expert tiles × N/BLOCK_N column blocks, most tiles empty "
                           "at T = 1; not wired into the model yet (TODO(#18))",
    "_compress_windows_kernel": "one window closes per token every `rate` steps; ≤ T·(C/BLOCK_C) programs over "
                                "8–256 slots: latency, not bandwidth, and a few KB per step",
    "_markov_finish_kernel": "one program per row scans the row's tile partials (V/BLOCK_V ≈ 1k floats): the "
                             "heavy V×r GEMV is `_markov_partials_kernel`, which fills the GPU",
    "_route_select_kernel": "top-k over E = 256 scores per token: a few KB; a program per token block",
    "_router_scores_kernel": "router GEMV x·Wᵀ of 256×4096 (2 MB) tiled by expert block; at T ≤ 16 one token "
                             "block, 256/BLOCK_E programs",
    "_chain_rejection_kernel": "one program per request walks ≤ γ+1 rows; the per-row statistics pass "
                               "(`_rejection_stats_kernel`) is the bandwidth part",
    "_rejection_stats_kernel": "one program per (request, verify row) over V: at R = 1 that is γ+1 rows of "
                               "129k logits (3 MB); split-V would need a second combine pass (TODO(#19))",
    "_sampling_kernel": "one program per row over V = 129k fp32 logits (0.5 MB per row); split-V needs a "
                        "combine pass for the exact top-k / top-p search (TODO(#19))",
    "_hc_weights_kernel": "one program per BLOCK_T tokens: at T = 1 one program reads 4×4096 streams (32 KB) "
                          "and runs a 20-step Sinkhorn on 4×4: latency-bound, bytes are negligible",
    "_hc_collapse_kernel": "T × D/BLOCK_D programs over 32 KB of streams: latency-bound at T = 1",
    "_hc_expand_kernel": "T × D/BLOCK_D programs over 64 KB of streams: latency-bound at T = 1",
    "_indexer_kernel": "one program per query scores its W entries and selects top-k in the same program "
                       "(the selection needs the whole row); at B·T = 1 that is one program reading 16k×128 "
                       "keys: split-W scoring with a separate selection launch is TODO(#19)",
    "_moe_gate_up_kernel": "tiles = cdiv(N·K, 16) + min(E, N·K) and cdiv(I, BLOCK_N) column blocks; at N = 1 "
                           "most tiles are empty (rows = 0) and exit at once",
    "_moe_down_kernel": "as the gate-up kernel: per-expert tiles × D/BLOCK_N column blocks",
    "_markov_logits_kernel": "V/BLOCK_V column tiles × row blocks: ~1k programs at V = 129k",
    "_markov_partials_kernel": "as `_markov_logits_kernel`",
}


# ----------------------------------------------------------------------------------------------------
# Model dims for the three configs the check covers.

@dataclasses.dataclass(frozen=True)
class Dims:
    name: str
    vocab: int
    hidden: int
    heads: int
    head_dim: int
    index_heads: int
    index_dim: int
    index_topk: int
    window: int
    csa_rate: int
    hca_rate: int
    experts: int
    top_k: int
    inter: int
    hc: int
    markov_rank: int
    context: int  # tokens already in the cache at decode
    dtype: torch.dtype = torch.bfloat16


def _from_config(name: str, cfg, markov_rank: int, context: int, dtype=torch.bfloat16) -> Dims:
    return Dims(name, cfg.vocab_size, cfg.hidden_size, cfg.num_heads, cfg.head_dim, cfg.index_n_heads,
                cfg.index_head_dim, cfg.index_topk, cfg.sliding_window, cfg.csa_rate, cfg.hca_rate,
                cfg.n_routed_experts, cfg.num_experts_per_tok, cfg.moe_intermediate_size, cfg.hc_mult, markov_rank,
                context, dtype)


def configs() -> dict[str, Dims]:
    from dspark.config import ModelConfig
    # nano: dspark/assets/nano/recipe.json (the embedded model; its trainer imports too much to build here).
    nano = Dims("nano", 8192, 128, 4, 64, 16, 32, 32, 128, 4, 32, 8, 2, 192, 4, 32, 1024)
    return {"nano": nano,
            "tiny": _from_config("tiny", ModelConfig.tiny(), 8, 64, torch.float32),
            "flash": _from_config("flash", ModelConfig.flash(), 256, 65536)}


@dataclasses.dataclass(frozen=True)
class DenseDims:
    """A dense HF target's attention (dspark/ops/paged_attention.py): heads, kv heads, head dim, its sliding
    window and logit softcap, the tokens already cached per request at decode, and the cache's page size."""
    name: str
    heads: int
    kv_heads: int
    head_dim: int
    window: int | None
    softcap: float | None
    context: int
    page: int = 16
    dtype: torch.dtype = torch.bfloat16


# Qwen3-8B (32 query heads over 8 kv heads, D = 128, full attention); Gemma-2-9B's sliding layers (16 over 8,
# D = 256, window 4096, softcap 50): the Gemma-style D = 256 shape with both options on.
DENSE = {"qwen3-8b": DenseDims("qwen3-8b", 32, 8, 128, None, None, 32768),
         "gemma-d256": DenseDims("gemma-d256", 16, 8, 256, 4096, 50.0, 32768)}


# ----------------------------------------------------------------------------------------------------
# Capture: run an op on fake CUDA tensors with `launch` swapped for a recorder.

@dataclasses.dataclass
class Launch:
    kernel: object
    grid: tuple
    args: tuple
    kwargs: dict


class Recorder:
    MODULES = ("attention", "compressor", "indexer", "markov", "mhc", "moe", "paged_attention", "rejection",
               "sampling", "quant_gemm")

    def __init__(self):
        self.launches: list[Launch] = []

    def _record(self, kernel, grid, *args, **kwargs):
        self.launches.append(Launch(kernel, tuple(int(g) for g in grid), args, kwargs))

    @contextlib.contextmanager
    def active(self):
        from torch._subclasses.fake_tensor import FakeTensorMode
        mods = [importlib.import_module(f"dspark.ops.{m}") for m in self.MODULES
                if importlib.util.find_spec(f"dspark.ops.{m}") is not None]
        moe = importlib.import_module("dspark.ops.moe")
        saved = [m.launch for m in mods]
        saved_tiles = moe.expert_tiles
        for m in mods:
            m.launch = self._record
        moe.expert_tiles = _expert_tiles_shapes
        quant = next((m for m in mods if m.__name__.endswith("quant_gemm")), None)
        saved_groups = quant.group_tiles if quant else None
        if quant:
            quant.group_tiles = _group_tiles_shapes
        try:
            with FakeTensorMode(allow_non_fake_inputs=True):
                yield self
        finally:
            for m, s in zip(mods, saved):
                m.launch = s
            moe.expert_tiles = saved_tiles
            if quant:
                quant.group_tiles = saved_groups


def _group_tiles_shapes(counts, num_rows, block_m=None):
    """`quant_gemm.group_tiles`' outputs by shape only (as `_expert_tiles_shapes`)."""
    from dspark.ops import quant_gemm
    block_m = block_m or quant_gemm._BLOCK_T
    tiles = -(-num_rows // block_m) + min(int(counts.shape[0]), num_rows)
    return tuple(torch.empty(tiles, dtype=torch.int32, device=counts.device) for _ in range(3))


def _expert_tiles_shapes(indices, num_experts, block_m=None):
    """`moe.expert_tiles`' outputs by shape only (its scatter_add has no fake CUDA kernel on a CPU build):
    the tile count is the same bound from shapes, cdiv(S, BLOCK_M) + min(E, S)."""
    from dspark.ops import moe
    block_m = block_m or moe._BLOCK_M
    s = indices.shape[0] * indices.shape[1]
    tiles = -(-s // block_m) + min(num_experts, s)
    dev = indices.device
    return (torch.empty(s, dtype=torch.long, device=dev),
            *(torch.empty(tiles, dtype=torch.int32, device=dev) for _ in range(3)))


def _t(*shape, dtype=torch.bfloat16):
    return torch.empty(*shape, dtype=dtype, device="cuda")


def _nbytes(*shapes_dtypes) -> int:
    total = 0
    for shape, dtype in shapes_dtypes:
        n = 1
        for s in shape:
            n *= int(s)
        total += n * torch.empty((), dtype=dtype).element_size()
    return total


# Each case calls one public op at one shape and returns {kernel name: bytes that launch must move}: inputs
# read once, outputs written once (T queries of distinct requests: the upper bound for shared rows).
F32, I32, I64 = torch.float32, torch.int32, torch.int64


def case_attention(d: Dims, t: int, parts: int = 3):
    from dspark import ops
    s = d.window + d.index_topk  # window slots + top-k compressed entries per query
    pool = d.context // d.csa_rate + 64
    q = _t(t, d.heads, d.head_dim, dtype=d.dtype)
    pools = [_t(d.window * max(t, 1), d.head_dim, dtype=d.dtype), _t(t, d.head_dim, dtype=d.dtype),
             _t(pool, d.head_dim, dtype=d.dtype)][:parts]
    index = _t(t, s, dtype=I32)
    ops.sparse_sink_attention(q, pools, index, _t(d.heads, dtype=F32), 0.05, kernels="triton")
    rows = min(t * s, sum(p.shape[0] for p in pools))
    b = _nbytes((q.shape, d.dtype), ((rows, d.head_dim), d.dtype), (index.shape, I32), (q.shape, d.dtype))
    return {"_sparse_sink_attention_kernel": b}


def case_indexer(d: Dims, t: int, dtype=None, mode="select"):
    from dspark import ops
    dtype = dtype or d.dtype
    w_n = max(d.context // d.csa_rate, 1)
    q = _t(1, t, d.index_heads, d.index_dim, dtype=dtype)
    keys = _t(w_n + 64, d.index_dim, dtype=d.dtype)  # the paged pool in the model dtype
    rows = _t(1, w_n, dtype=I32)
    w = _t(1, t, d.index_heads, dtype=F32)
    vis = _t(1, t, dtype=I64)
    if mode == "select":
        ops.indexer_select(q, keys, w, vis, d.index_topk, rows=rows, kernels="triton")
    elif mode == "scores":
        ops.indexer_scores(q, keys, w, rows=rows, kernels="triton")
    else:
        ops.indexer_topk(_t(1, t, w_n, dtype=F32), vis, d.index_topk, kernels="triton")
    b = _nbytes((q.shape, dtype), ((w_n, d.index_dim), d.dtype), (rows.shape, I32), (w.shape, F32),
                ((1, t, w_n), F32), ((1, t, d.index_topk), I64)) if mode != "topk" else \
        _nbytes(((1, t, w_n), F32), ((1, t, d.index_topk), I64))
    return {"_indexer_kernel": b}


def case_compressor(d: Dims, t: int):
    from dspark import ops
    p = 2 * d.csa_rate
    kv = _t(t, p, d.head_dim, dtype=d.dtype)
    ops.compress_windows(kv, _t(t, p, d.head_dim, dtype=F32), kernels="triton")
    return {"_compress_windows_kernel": _nbytes((kv.shape, d.dtype), (kv.shape, F32), ((t, d.head_dim), F32))}


def case_markov(d: Dims, t: int):
    from dspark import ops
    logits, x, w2 = _t(t, d.vocab, dtype=F32), _t(t, d.markov_rank, dtype=d.dtype), _t(d.vocab, d.markov_rank,
                                                                                        dtype=d.dtype)
    ops.markov_logits(logits, x, w2, kernels="triton")
    ops.markov_sample(logits, x, w2, _t(t, dtype=F32), _t(t, dtype=I64), _t(t, dtype=F32), _t(t, dtype=F32),
                      kernels="triton")
    gemv = _nbytes((logits.shape, F32), (w2.shape, d.dtype), (logits.shape, F32))
    return {"_markov_logits_kernel": gemv, "_markov_partials_kernel": gemv,
            "_markov_finish_kernel": _nbytes((logits.shape, F32))}


def case_mhc(d: Dims, t: int):
    from dspark import ops
    n = d.hc
    streams = _t(t, n, d.hidden, dtype=d.dtype)
    fn, base, scale = _t((2 + n) * n, n * d.hidden, dtype=F32), _t((2 + n) * n, dtype=F32), _t(3, dtype=F32)
    pre, post, comb, _ = ops.hc_weights_collapse(streams, fn, base, scale, 20, 1e-6, 1e-6, kernels="triton")
    ops.hc_collapse(pre, streams, kernels="triton")
    ops.hc_expand(post, comb, _t(t, d.hidden, dtype=d.dtype), streams, kernels="triton")
    s = _nbytes((streams.shape, d.dtype))
    return {"_hc_weights_kernel": s + _nbytes((fn.shape, F32), ((t, d.hidden), d.dtype)),
            "_hc_collapse_kernel": s + _nbytes(((t, d.hidden), d.dtype)),
            "_hc_expand_kernel": 2 * s + _nbytes(((t, d.hidden), d.dtype))}


def case_moe(d: Dims, t: int):
    from dspark import ops
    x = _t(t, d.hidden, dtype=d.dtype)
    gate_w = _t(d.experts, d.hidden, dtype=d.dtype)
    ops.score_route(x, gate_w, _t(d.experts, dtype=F32), d.top_k, "sqrtsoftplus", 1.5, kernels="triton")
    weights, indices = _t(t, d.top_k, dtype=F32), _t(t, d.top_k, dtype=I64)
    ops.experts(x, weights, indices, _t(d.experts, 2 * d.inter, d.hidden, dtype=d.dtype),
                _t(d.experts, d.hidden, d.inter, dtype=d.dtype), 10.0, kernels="triton")
    touched = min(t * d.top_k, d.experts)  # distinct experts at most (performance.md's floor)
    slots = t * d.top_k
    return {"_router_scores_kernel": _nbytes((x.shape, d.dtype), (gate_w.shape, d.dtype), ((t, d.experts), F32)),
            "_route_select_kernel": _nbytes(((t, d.experts), F32), ((t, d.top_k), F32), ((t, d.top_k), I64)),
            "_moe_gate_up_kernel": _nbytes((x.shape, d.dtype), ((touched, 2 * d.inter, d.hidden), d.dtype),
                                           ((slots, d.inter), d.dtype)),
            "_moe_down_kernel": _nbytes(((slots, d.inter), d.dtype), ((touched, d.hidden, d.inter), d.dtype),
                                        ((slots, d.hidden), F32))}


def case_rejection(d: Dims, t: int, gamma: int = 5):
    from dspark import ops
    r = t
    target = _t(r * (gamma + 1), d.vocab, dtype=F32)
    draft = _t(r, gamma, d.vocab, dtype=F32)
    ops.chain_rejection(target, _t(r, dtype=I64), _t(r, dtype=I64), draft, _t(r, gamma, dtype=I64),
                        _t(r, dtype=F32), _t(r, dtype=I64), _t(r, dtype=F32), _t(r, 2, dtype=I64),
                        _t(r, gamma, dtype=F32), _t(r, dtype=F32), kernels="triton")
    rows = _nbytes((target.shape, F32), (draft.shape, F32))
    return {"_rejection_stats_kernel": rows, "_chain_rejection_kernel": _nbytes(((r, d.vocab), F32))}


def case_sampling(d: Dims, t: int):
    from dspark import ops
    logits = _t(t, d.vocab, dtype=F32)
    ops.sample_logits(logits, _t(t, dtype=F32), _t(t, dtype=I64), _t(t, dtype=F32), _t(t, dtype=F32),
                      kernels="triton")
    return {"_sampling_kernel": _nbytes((logits.shape, F32))}


def case_quant(d: Dims, t: int):
    """The release-format GEMMs (dspark/ops/quant_gemm.py): an FP8 block-scaled hidden × hidden projection and
    the grouped FP4 gate-up of the routed experts (T·K rows over E experts), x in bf16 in every config: the
    release path. NOTE: fp32 x (the tests' dtype) spilled 0.5–3.6 KB per thread on Triton 3.9 (tiny shapes,
    IEEE fp32 dots on whole tiles, as the indexer before issue #19); that is issue #18's to fix."""
    from dspark.ops import quant_gemm
    u8 = torch.uint8
    x = _t(t, d.hidden, dtype=torch.bfloat16)
    w8, s8 = _t(d.hidden, d.hidden, dtype=u8), _t(-(-d.hidden // 128), -(-d.hidden // 128), dtype=u8)
    quant_gemm.fp8_linear(x, w8, s8, kernels="triton")
    rows, n = t * d.top_k, 2 * d.inter
    xe = _t(rows, d.hidden, dtype=x.dtype)
    w4 = _t(d.experts, n, d.hidden // 2, dtype=u8)
    s4 = _t(d.experts, n, -(-d.hidden // quant_gemm.FP4_BLOCK), dtype=u8)
    quant_gemm.fp4_experts(xe, w4, s4, _t(d.experts, dtype=I64), kernels="triton")
    touched = min(rows, d.experts)
    return {"_fp8_linear_kernel": _nbytes((x.shape, x.dtype), (w8.shape, u8), (s8.shape, u8), ((t, d.hidden), F32)),
            "_fp4_experts_kernel": _nbytes((xe.shape, x.dtype), ((touched, n, d.hidden // 2), u8),
                                           ((touched, n, s4.shape[2]), u8), ((rows, n), F32))}


def case_paged_attention(d: DenseDims, t: int):
    """T tokens of T requests (decode; for prefill sizes the distinct-request upper bound), each at position
    context − 1 of its own block-table row."""
    from dspark import ops
    pages_per_slot = -(-d.context // d.page)
    q = _t(t, d.heads, d.head_dim, dtype=d.dtype)
    kv_shape = (t * pages_per_slot + 1, d.page, d.kv_heads, d.head_dim)
    ops.paged_attention(q, _t(*kv_shape, dtype=d.dtype), _t(*kv_shape, dtype=d.dtype), _t(t, pages_per_slot, dtype=I64),
                        _t(t, dtype=I64), _t(t, dtype=I64), d.head_dim ** -0.5, window=d.window, softcap=d.softcap,
                        kernels="triton")
    keys = min(d.context, d.window or d.context)  # positions each token reads
    b = _nbytes((q.shape, d.dtype), ((2 * t * keys, d.kv_heads, d.head_dim), d.dtype), ((t, pages_per_slot), I64),
                ((2 * t,), I64), (q.shape, d.dtype))
    return {"_paged_attention_kernel": b}


OPS = {"attention": case_attention, "indexer": case_indexer, "compressor": case_compressor, "markov": case_markov,
       "mhc": case_mhc, "moe": case_moe, "rejection": case_rejection, "sampling": case_sampling}
if importlib.util.find_spec("dspark.ops.quant_gemm") is not None:  # issue #18's kernels, where present
    OPS["quant"] = case_quant


def cases(tier: str) -> list[tuple[str, str, int, object]]:
    """(label, config, T, thunk) for the tier: fast = V4-Flash decode T = 1 (+ the fp32 indexer) and the dense
    targets' paged attention at decode T = 1, full = every
    config at decode and prefill sizes (1, odd, multiples of 16) plus the variants."""
    dims = configs()
    out = []
    if tier == "fast":
        fl = dims["flash"]
        for op, fn in OPS.items():
            out.append((op, "flash", 1, lambda fn=fn: fn(fl, 1)))
        out.append(("indexer fp32 q", "flash", 1, lambda: case_indexer(fl, 1, dtype=F32)))
        for name, dd in DENSE.items():  # decode: the split path (T × kv heads < SMs)
            out.append(("paged attention", name, 1, lambda dd=dd: case_paged_attention(dd, 1)))
        return out
    sizes = {"nano": (1, 5, 64, 1024), "tiny": (1, 7, 16, 64), "flash": (1, 8, 64, 2048)}
    for name, d in dims.items():
        for t in sizes[name]:
            for op, fn in OPS.items():
                out.append((op, name, t, lambda fn=fn, d=d, t=t: fn(d, t)))
            out.append(("indexer fp32 q", name, t, lambda d=d, t=t: case_indexer(d, t, dtype=F32)))
            out.append(("indexer scores", name, t, lambda d=d, t=t: case_indexer(d, t, mode="scores")))
            out.append(("indexer topk", name, t, lambda d=d, t=t: case_indexer(d, t, mode="topk")))
            out.append(("attention 1 part", name, t, lambda d=d, t=t: case_attention(d, t, parts=1)))
            out.append(("attention fp32", name, t, lambda d=d, t=t: case_attention(
                dataclasses.replace(d, dtype=F32), t)))
    for name, dd in DENSE.items():  # split at T ≤ 16 (8 kv heads), fused from 17
        for t in (1, 7, 16, 64, 256):
            out.append(("paged attention", name, t, lambda dd=dd, t=t: case_paged_attention(dd, t)))
        out.append(("paged attention fp32", name, 64, lambda dd=dd: case_paged_attention(
            dataclasses.replace(dd, dtype=F32), 64)))
    return out


# ----------------------------------------------------------------------------------------------------
# Compile and read back.

_PTXAS = [(re.compile(r"Used (\d+) registers"), "regs"),
          (re.compile(r"(\d+) bytes stack frame"), "stack"),
          (re.compile(r"(\d+) bytes spill stores"), "spill_stores"),
          (re.compile(r"(\d+) bytes spill loads"), "spill_loads")]


class _Mock:
    """A pointer argument for the binder: its dtype, 16-byte aligned (as CUDA allocations are)."""

    def __init__(self, dtype):
        self.dtype = dtype

    @staticmethod
    def data_ptr():
        return 0


def _stub(x):
    return _Mock(x.dtype) if isinstance(x, torch.Tensor) else x


_CACHE: dict = {}


def compile_launch(launch: Launch, arch: int) -> dict:
    """Compile one recorded launch for sm_<arch>; → resources (or an error). Identical specialisations are
    compiled once."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    kernel = launch.kernel
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    args = [_stub(a) for a in launch.args]
    kwargs = {k: _stub(v) for k, v in launch.kwargs.items()}
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, spec, opts = binder(*args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, spec, opts)
    key = (kernel.fn.__name__, arch, repr(signature), repr(sorted(constexprs.items(), key=str)),
           repr(sorted(attrs.items(), key=str)), repr(sorted(options.__dict__.items())))
    if key in _CACHE:
        return dict(_CACHE[key], cached=True)
    log = io.StringIO()
    t0 = time.perf_counter()
    try:
        with contextlib.redirect_stdout(log), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            compiled = triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=target,
                                      options=options.__dict__)
    except Exception as err:  # noqa: BLE001 - every compile failure is a gate
        res = {"error": f"{type(err).__name__}: {str(err).strip().splitlines()[-1][:300] if str(err).strip() else ''}"}
        _CACHE[key] = res
        return res
    res = {"compile_s": round(time.perf_counter() - t0, 2)}
    text = log.getvalue()
    for pattern, name in _PTXAS:
        m = pattern.search(text)
        res[name] = int(m.group(1)) if m else None
    md = compiled.metadata
    res.update(shared=int(md.shared), warps=int(md.num_warps), stages=int(md.num_stages),
               wgmma="wgmma" in compiled.asm.get("ptx", ""))
    _CACHE[key] = res
    return res


def blocks_per_sm(regs: int, shared: int, warps: int, arch: int) -> int:
    """Resident blocks per SM from registers (per-warp allocation in units of 256), shared memory (+1 KB
    runtime reserve per block) and warps; the CUDA occupancy calculator's rules."""
    a = ARCHS[arch]
    per_warp = -(-max(regs, 1) * 32 // 256) * 256
    by_regs = (a["regs"] // per_warp) // warps
    by_smem = a["sm_shared"] // (shared + 1024) if shared else a["blocks"]
    by_warps = a["warps"] // warps
    return max(0, min(by_regs, by_smem, by_warps, a["blocks"]))


def gates(row: dict, arch: int) -> list[str]:
    fails = []
    if "error" in row:
        return [f"compile error: {row['error']}"]
    if row["shared"] > ARCHS[arch]["shared"]:
        fails.append(f"shared {row['shared']} B > {ARCHS[arch]['shared']} B")
    spill = max(row.get("spill_stores") or 0, row.get("spill_loads") or 0)
    if spill > SPILL_LIMIT:
        fails.append(f"spills {spill} B > {SPILL_LIMIT} B")
    grid = tuple(row["grid"]) + (1,) * (3 - len(row["grid"]))
    if any(g > lim for g, lim in zip(grid, GRID_LIMITS)):
        fails.append(f"grid {tuple(row['grid'])} beyond CUDA's {GRID_LIMITS}")
    return fails


def check_launch(launch: Launch, arch: int, meta: dict) -> dict:
    row = dict(meta, kernel=launch.kernel.fn.__name__, arch=ARCHS[arch]["name"], grid=list(launch.grid))
    row.update(compile_launch(launch, arch))
    programs = 1
    for g in launch.grid:
        programs *= g
    row["programs"] = programs
    if "error" not in row:
        bps = blocks_per_sm(row["regs"] or 255, row["shared"], row["warps"], arch)
        row["blocks_per_sm"] = bps
        row["waves"] = round(programs / (bps * ARCHS[arch]["sms"]), 4) if bps else None
    row["sm_fill"] = round(min(1.0, programs / ARCHS[arch]["sms"]), 4)  # share of SMs with a block
    b = row.get("bytes")
    if b:
        for gpu, bw in BANDWIDTH.items():
            row[f"floor_us_{gpu}"] = round(b / bw * 1e6, 3)
    row["fails"] = gates(row, arch)
    return row


def run(tier: str, archs: list[int], only: str | None = None, log=print) -> list[dict]:
    rows = []
    for label, cfg, t, thunk in cases(tier):
        if only and only not in label:
            continue
        rec = Recorder()
        try:
            with rec.active():
                nbytes = thunk()
        except Exception as err:  # noqa: BLE001 - a launcher that cannot even build its launch is a failure
            rows.append(dict(op=label, config=cfg, T=t, kernel="?", arch="-", grid=[], programs=0,
                             fails=[f"capture failed: {type(err).__name__}: {err}"]))
            log(f"{label:18s} {cfg:6s} T={t:<5d} CAPTURE FAILED {err}")
            continue
        seen = set()
        for ln in rec.launches:
            name = ln.kernel.fn.__name__
            for arch in archs:
                meta = dict(op=label, config=cfg, T=t, bytes=nbytes.get(name) if name not in seen else None)
                row = check_launch(ln, arch, meta)
                rows.append(row)
                log(_line(row))
            seen.add(name)
    return rows


def _line(r: dict) -> str:
    if "error" in r:
        return f"{r['op']:18s} {r['config']:6s} T={r['T']:<5d} {r['kernel']:30s} {r['arch']} ERROR {r['error']}"
    return (f"{r['op']:18s} {r['config']:6s} T={r['T']:<5d} {r['kernel']:30s} {r['arch']} grid={tuple(r['grid'])} "
            f"regs={r['regs']} spill={r['spill_stores']} shared={r['shared']} warps={r['warps']} "
            f"stages={r['stages']} blocks/SM={r['blocks_per_sm']} waves={r['waves']}"
            + (f" FAIL {'; '.join(r['fails'])}" if r["fails"] else ""))


# ----------------------------------------------------------------------------------------------------
# Negative controls: kernels built to trip each gate (the test asserts each one fires).

def _controls() -> list[dict]:
    import triton
    import triton.language as tl

    @triton.jit
    def _bad_dot_kernel(x_ptr, out_ptr, BLOCK: tl.constexpr):
        i = tl.arange(0, BLOCK)
        a = tl.load(x_ptr + i[:, None] * BLOCK + i[None, :])  # [BLOCK, BLOCK]
        b = tl.load(x_ptr + tl.arange(0, 2 * BLOCK)[:, None] * BLOCK + i[None, :])  # [2·BLOCK, BLOCK]
        tl.store(out_ptr + i[:, None] * BLOCK + i[None, :], tl.dot(a, b))  # inner dims differ

    @triton.jit
    def _big_block_kernel(a_ptr, b_ptr, c_ptr, K, BLOCK: tl.constexpr, BLOCK_K: tl.constexpr):
        i = tl.arange(0, BLOCK)
        k = tl.arange(0, BLOCK_K)
        acc = tl.zeros([BLOCK, BLOCK], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            a = tl.load(a_ptr + i[:, None] * K + k0 + k[None, :])
            b = tl.load(b_ptr + (k0 + k[:, None]) * BLOCK + i[None, :])
            acc += tl.dot(a, b)
        tl.store(c_ptr + i[:, None] * BLOCK + i[None, :], acc)

    @triton.jit
    def _spill_kernel(x_ptr, out_ptr, BLOCK: tl.constexpr):
        i = tl.arange(0, BLOCK)
        x = tl.load(x_ptr + i)  # BLOCK / 32 values per thread at one warp, live across the reductions
        m = tl.max(x, axis=0)
        s = tl.sum(tl.exp(x - m), axis=0)
        tl.store(out_ptr + tl.flip(i, 0), x * s - m)

    bf = torch.bfloat16
    plans = [("bad tl.dot", Launch(_bad_dot_kernel, (1,), (_Mock(F32), _Mock(F32)), dict(BLOCK=16)), "compile error"),
             ("oversized block", Launch(_big_block_kernel, (1,), (_Mock(bf), _Mock(bf), _Mock(F32), 4096),
                                        dict(BLOCK=128, BLOCK_K=128, num_stages=6, num_warps=8)), "shared"),
             ("forced spill", Launch(_spill_kernel, (1,), (_Mock(F32), _Mock(F32)),
                                     dict(BLOCK=8192, num_warps=1)), "spills"),
             ("grid beyond limits", Launch(_spill_kernel, (1, 70000), (_Mock(F32), _Mock(F32)),
                                           dict(BLOCK=32, num_warps=1)), "grid")]
    rows = []
    for label, ln, expect in plans:
        for arch in ARCHS:
            row = check_launch(ln, arch, dict(op=f"control: {label}", config="-", T=0, bytes=None))
            row["expect"] = expect
            row["fired"] = any(f.startswith(expect) for f in row["fails"])
            rows.append(row)
    return rows


# ----------------------------------------------------------------------------------------------------
# The kept table.

def markdown(rows: list[dict], versions: str) -> str:
    head = ("| op | config | T | kernel | arch | grid | programs | regs | spill B | shared B | warps | stages | "
            "blocks/SM | waves | SM fill | bytes | floor µs H100 | floor µs H200 | gates |")
    lines = [f"Triton kernels compiled for sm_90 / sm_80 ({versions}); waves over "
             f"{ARCHS[90]['sms']} SMs (sm_90) / {ARCHS[80]['sms']} SMs (sm_80).", "", head,
             "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['op']} | {r['config']} | {r['T']} | {r['kernel']} | {r['arch']} | "
                         f"{tuple(r['grid'])} | {r['programs']} | | | | | | | | | | | | {'; '.join(r['fails'])} |")
            continue
        lines.append("| " + " | ".join(str(x) for x in (
            r["op"], r["config"], r["T"], r["kernel"], r["arch"], "×".join(map(str, r["grid"])), r["programs"],
            r["regs"], max(r["spill_stores"] or 0, r["spill_loads"] or 0), r["shared"], r["warps"], r["stages"],
            r["blocks_per_sm"], r["waves"], r["sm_fill"], r.get("bytes") or "", r.get("floor_us_H100", ""),
            r.get("floor_us_H200", ""), "; ".join(r["fails"]) or "ok")) + " |")
    low = sorted({r["kernel"] for r in rows if r.get("config") == "flash" and r.get("T", 0) and r["T"] <= 64
                  and "error" not in r and r.get("arch") == "sm_90" and r["sm_fill"] < 1})
    if low:
        lines += ["", "Kernels that leave SMs idle at a V4-Flash decode shape (T ≤ 64) on sm_90, and why:", ""]
        lines += [f"- `{k}`: {LOW_FILL_REASONS.get(k, 'NO REASON WRITTEN')}" for k in low]
    return "\n".join(lines) + "\n"


def versions() -> str:
    import triton
    return f"triton {triton.__version__}, torch {torch.__version__}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tier", choices=("fast", "full"), default="fast")
    ap.add_argument("--arch", default="90,80", help="comma-separated compute capabilities (90, 80)")
    ap.add_argument("--only", default=None, help="only ops whose label contains this")
    ap.add_argument("--controls", action="store_true", help="run the negative controls instead")
    ap.add_argument("--out", default=None, help="folder for table-<triton version>.md and rows-<version>.json")
    ap.add_argument("--json", default=None, help="write the rows to this JSON file")
    ap.add_argument("--quiet", action="store_true")
    a = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("TRITON_INTERPRET=1 is set: run this as a script (it unsets it), not in-process")
    log = (lambda *_: None) if a.quiet else (lambda s: print(s, flush=True))
    t0 = time.perf_counter()
    if a.controls:
        rows = _controls()
        for r in rows:
            log(f"{r['op']:28s} {r['arch']} expect {r['expect']!r}: fired={r['fired']} {r['fails']}")
        ok = all(r["fired"] for r in rows)
    else:
        rows = run(a.tier, [int(x) for x in a.arch.split(",")], a.only, log)
        ok = not any(r["fails"] for r in rows)
    summary = dict(versions=versions(), tier=a.tier, controls=a.controls, seconds=round(time.perf_counter() - t0, 1),
                   ok=ok, rows=rows)
    if a.json:
        Path(a.json).write_text(json.dumps(summary, indent=1, default=str))
    if a.out and not a.controls:
        out = Path(a.out)
        out.mkdir(parents=True, exist_ok=True)
        import triton
        (out / f"table-triton{triton.__version__}-{a.tier}.md").write_text(markdown(rows, versions()))
    fails = [r for r in rows if r["fails"]] if not a.controls else [r for r in rows if not r["fired"]]
    print(f"== kernel_check ({versions()}, tier {a.tier}{', controls' if a.controls else ''}): {len(rows)} rows, "
          f"{len(fails)} failing, {summary['seconds']} s")
    for r in fails:
        print(f"FAIL {r['op']} {r['config']} T={r['T']} {r['kernel']} {r['arch']}: {r['fails']}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
