"""tools/kernel_check.py: every Triton kernel compiled for sm_90 and sm_80 on CPU (no GPU, no driver), its
gates, and negative controls that show each gate fires.

The compile runs in a subprocess: tests/conftest.py sets TRITON_INTERPRET=1, which turns the kernels into
interpreter objects in this process. Default tier: each kernel once per arch at V4-Flash decode shapes, and
the controls. Extended tier: every config (nano, tiny, V4-Flash) at decode and prefill sizes and the variants.
The pure parts (occupancy, gates) are checked in-process. KERNEL_CHECK_PYTHONS adds interpreters whose
Triton is checked too (the GPU machines run 3.6; CI installs the newest).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TOOL = ROOT / "tools" / "kernel_check.py"


def _ptxas_available() -> bool:
    try:
        import triton
    except ImportError:
        return False
    return (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas").exists()


needs_ptxas = pytest.mark.skipif(not _ptxas_available() or sys.platform != "linux",
                                 reason="needs triton's bundled ptxas (Linux wheel)")

# Every @triton.jit kernel the ops launch (helpers called from kernels are compiled into them).
KERNELS = {"_sparse_sink_attention_kernel", "_sparse_sink_combine_kernel", "_compress_windows_kernel",
           "_indexer_kernel", "_markov_logits_kernel", "_markov_partials_kernel", "_markov_finish_kernel",
           "_hc_weights_kernel", "_hc_collapse_kernel", "_hc_expand_kernel", "_router_scores_kernel",
           "_route_select_kernel", "_moe_gate_up_kernel", "_moe_down_kernel", "_rejection_stats_kernel",
           "_chain_rejection_kernel", "_sampling_kernel"}
QUANT_KERNELS = {"_fp8_linear_kernel", "_fp4_experts_kernel"}  # dspark/ops/quant_gemm.py, where present


def _load_tool():
    spec = importlib.util.spec_from_file_location("kernel_check", TOOL)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up while the class is built
    spec.loader.exec_module(mod)
    return mod


# Another Python whose Triton to check as well (e.g. a venv with triton==3.6.0, the GPU machines' version):
# KERNEL_CHECK_PYTHONS=/work/venv36/bin/python pytest tests/test_kernel_check.py
PYTHONS = [sys.executable] + [p for p in os.environ.get("KERNEL_CHECK_PYTHONS", "").split(os.pathsep) if p]


def _run(tmp_path: Path, *args: str, timeout: int, python: str = sys.executable) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("OMP_NUM_THREADS", "1")
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")  # never reuse a stale cubin
    out = tmp_path / "rows.json"
    proc = subprocess.run([python, str(TOOL), "--quiet", "--json", str(out), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert out.exists(), f"no JSON written (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    summary = json.loads(out.read_text())
    summary["returncode"], summary["stdout"] = proc.returncode, proc.stdout
    shutil.rmtree(tmp_path / "triton-cache", ignore_errors=True)
    return summary


def _assert_clean(summary: dict) -> None:
    fails = [(r["op"], r["config"], r["T"], r["kernel"], r["arch"], r["fails"]) for r in summary["rows"]
             if r["fails"]]
    assert not fails and summary["returncode"] == 0, f"gates failed:\n{summary['stdout'][-3000:]}"


@needs_ptxas
@pytest.mark.parametrize("python", PYTHONS)
def test_every_kernel_compiles_for_hopper_and_ampere_at_flash_decode(tmp_path, python):
    summary = _run(tmp_path, "--tier", "fast", timeout=600, python=python)
    _assert_clean(summary)
    seen = {(r["kernel"], r["arch"]) for r in summary["rows"]}
    kernels = KERNELS | (QUANT_KERNELS if importlib.util.find_spec("dspark.ops.quant_gemm") else set())
    missing = {(k, a) for k in kernels for a in ("sm_90", "sm_80")} - seen
    assert not missing, f"kernels not compiled: {sorted(missing)}"
    for r in summary["rows"]:
        assert r["regs"] and r["blocks_per_sm"] >= 1 and r["waves"] > 0, r
        assert r["shared"] >= 0 and r["warps"] in (1, 2, 4, 8, 16, 32), r
    # The split-key attention fills more of the GPU at T = 1 than one program per head block would.
    attn = [r for r in summary["rows"] if r["kernel"] == "_sparse_sink_attention_kernel" and r["T"] == 1]
    assert attn and all(r["programs"] >= 40 for r in attn), attn


@needs_ptxas
@pytest.mark.parametrize("python", PYTHONS)
def test_negative_controls_fire_every_gate(tmp_path, python):
    """A tl.dot with mismatched inner dims, a block whose pipelined tiles overflow shared memory, a kernel
    forced to spill and a grid past 65535 in y: each must trip its gate, on both archs."""
    summary = _run(tmp_path, "--controls", timeout=300, python=python)
    rows = summary["rows"]
    assert {r["expect"] for r in rows} == {"compile error", "shared", "spills", "grid"}
    assert all(r["fired"] for r in rows), [(r["op"], r["arch"], r["fails"]) for r in rows if not r["fired"]]
    assert summary["returncode"] == 0


def test_occupancy_and_gates_arithmetic():
    kc = _load_tool()
    # 255 registers × 8 warps: 8 × 8192 = 64k registers, one block; 32 registers × 4 warps: warp-limited 16.
    assert kc.blocks_per_sm(255, 0, 8, 90) == 1
    assert kc.blocks_per_sm(32, 0, 4, 90) == 16
    # shared memory: 66 KB + 1 KB reserve → 3 blocks on sm_90 (228 KB), 2 on sm_80 (164 KB)
    assert kc.blocks_per_sm(32, 66 * 1024, 4, 90) == 3 and kc.blocks_per_sm(32, 66 * 1024, 4, 80) == 2
    ok = dict(shared=1024, spill_stores=0, spill_loads=0, grid=[1, 2])
    assert kc.gates(ok, 90) == []
    assert kc.gates(dict(ok, shared=232449), 90)[0].startswith("shared")
    assert kc.gates(dict(ok, shared=200000), 90) == [] and kc.gates(dict(ok, shared=200000), 80)
    assert kc.gates(dict(ok, spill_loads=257), 80)[0].startswith("spills")
    assert kc.gates(dict(ok, spill_stores=256), 80) == []
    assert kc.gates(dict(ok, grid=[2 ** 31, 1]), 90)[0].startswith("grid")
    assert kc.gates(dict(ok, grid=[1, 1, 65536]), 90)[0].startswith("grid")
    assert kc.gates(dict(error="CompilationError: x"), 90)[0].startswith("compile error")


@pytest.mark.extended
@needs_ptxas
@pytest.mark.parametrize("python", PYTHONS)
def test_full_sweep_every_config_and_size(tmp_path, python):
    """nano, tiny and V4-Flash at decode (1, odd, multiples of 16) and prefill sizes, with the fp32,
    scores-only, top-k-only, one-part and fp32-attention variants."""
    summary = _run(tmp_path, "--tier", "full", timeout=3000, python=python)
    _assert_clean(summary)
    assert {r["kernel"] for r in summary["rows"]} >= KERNELS
