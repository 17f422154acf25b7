"""tools/gpu_costs.py and tools/gpu_check.sh rehearsed on CPU: the GPU lease is too short to find a
broken script there. Tiny shapes; the figures are noise, the structure is what is checked."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dspark.simulate import CostTable

TOOLS = Path(__file__).resolve().parents[1] / "tools"
COMPONENTS = {"verify", "attention.sliding", "attention.csa", "attention.hca", "moe.hash", "moe.score", "mhc",
              "mtp.block", "lm_head", "sampler", "sampler.filtered", "draft.context", "draft.stage", "draft.pass",
              "markov_step", "markov_step.unfused", "rejection", "rejection.g1", "rejection.g0"}
POLICIES = {"ar", "mtp-1", "dspark-fixed", "dspark-hardware"}


def load_tool():
    spec = importlib.util.spec_from_file_location("gpu_costs", TOOLS / "gpu_costs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_costs")
    log = out / "tests.log"
    log.write_text("....\n===== 4 passed, 1 skipped in 1.00s =====\n")
    threads = torch.get_num_threads()
    try:
        assert load_tool().main(["--smoke", "--device", "cpu", "--out", str(out), "--tests-log", str(log)]) == 0
    finally:
        torch.set_num_threads(threads)
    return out, json.loads((out / "costs.json").read_text())


def test_smoke_run_times_every_component_of_every_bucket(smoke):
    _, data = smoke
    assert data["complete"] and data["dtype"] == "bf16" and data["preset"] == "tiny"
    for key in ("python", "torch", "triton", "cuda"):
        assert key in data["versions"]
    assert data["source"]["commit"] is None or len(data["source"]["commit"]) == 40
    assert len(data["source"]["source_sha256"]) == 64
    assert data["tests"]["summary"] == ["4 passed, 1 skipped in 1.00s"]
    comps = data["components"]
    # tiny has every attention and MoE kind, so every layer combination it holds is timed too
    layers = {f"layer.{a}-{m}" for a, m in zip(data["config"]["layer_types"], data["config"]["mlp_layer_types"])}
    assert set(comps) == COMPONENTS | layers
    setup = data["setup"]
    for name, entry in comps.items():
        buckets = setup["buckets"] if entry["unit"] == "tokens" else setup["request_buckets"]
        # on CPU nothing may be skipped: a reason here is a bug in the script or the package
        assert "skipped_reason" not in entry and "skipped" not in entry, (name, entry)
        assert sorted(int(b) for b in entry["us"]) == buckets, name
        assert all(math.isfinite(v) and v > 0 for v in entry["us"].values()), name


def test_smoke_run_checks_bf16_against_fp32(smoke):
    chk = smoke[1]["correctness"]
    assert chk["finite"] and chk["threshold"] == 2e-2 and chk["flagged"] == (chk["rel_err"] > 2e-2)
    # bf16 rounding, plus the odd flipped expert / indexer choice: far from 0, far from garbage
    assert 1e-4 < chk["rel_err"] < 0.5 and 0.5 < chk["argmax_agreement"] <= 1
    # on CPU "the kernels" are the references: identical logits, so the kernel verdict must hold
    assert chk["rel_err"] == chk["ref_rel_err"] and chk["fp32_kernels_vs_ref_rel_err"] == 0 and chk["kernels_ok"]


def test_smoke_cost_tables_load_for_the_simulator(smoke):
    out, data = smoke
    for path in (out / "cost_gpu.json", out / "costs.json"):
        table = CostTable.load(path)
        assert sorted(table.verify_ms) == data["setup"]["buckets"]
        assert set(table.draft_ms) == POLICIES
        assert all(sorted(row) == data["setup"]["request_buckets"] for row in table.draft_ms.values())
        # within the measured buckets (CPU noise can tilt the extrapolation past them)
        assert all(v > 0 for v in table.sps(max(data["setup"]["buckets"]))[1:])
    # tiny is its own full model: nothing is composed onto the measured verify forward
    assert data["verify_ms"] == data["verify_ms_proxy"]


def test_summary_is_printed_from_the_json(smoke, capsys):
    out, _ = smoke
    assert load_tool().main(["--summarize", str(out / "costs.json")]) == 0
    text = capsys.readouterr().out
    assert "bf16 check: rel_err" in text and "draft.pass" in text and "complete" in text


def test_on_references_copies_the_model_onto_the_references():
    from dspark.config import ModelConfig
    from dspark.model import DeepseekV4

    tool = load_tool()
    model = DeepseekV4.random(ModelConfig.tiny(), seed=0).eval()
    ref = tool.on_references(model)
    assert ref.config.kernels == "ref" and model.config.kernels == "auto"
    assert all(m.kernels == "ref" for m in ref.modules() if hasattr(m, "kernels"))
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), ref.state_dict().values()))


def test_help_names_the_options(capsys):
    with pytest.raises(SystemExit) as code:
        load_tool().main(["--help"])
    assert code.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--device", "--dtype", "--preset", "--buckets", "--smoke", "--out", "--budget-s"):
        assert flag in text


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_gpu_check_script_parses():
    subprocess.run(["bash", "-n", str(TOOLS / "gpu_check.sh")], check=True)


@pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None, reason="needs bash, timeout")
def test_gpu_check_rehearsal_on_cpu(tmp_path):
    """SMOKE=1: the script's own flow (tests, cost table, summary last) with one test file, tiny shapes;
    tools/gpu_costs.py runs as a script, with tools/ leading sys.path."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SMOKE": "1", "OUT": str(tmp_path), "PYTHON": sys.executable}
    env.pop("TRITON_INTERPRET", None)  # the script must not need it; conftest sets it where there is no GPU
    proc = subprocess.run(["bash", str(TOOLS / "gpu_check.sh")], capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cost_gpu.json", "costs.json", "costs.log", "e2e.json",
                                                          "e2e.log", "tests.log"]
    rows = json.loads((tmp_path / "e2e.json").read_text())["rows"]
    assert [r["method"] for r in rows] == ["ar", "dspark"] and all(r["per_user_tps"] > 0 for r in rows)
    summary = proc.stdout[proc.stdout.index("== gpu_check summary"):]
    assert "tests status 0, costs status 0" in summary and "\ncomplete\n" in summary
    tests = json.loads((tmp_path / "costs.json").read_text())["tests"]["summary"][-1]
    assert " passed" in tests and "failed" not in tests and "error" not in tests
