#!/usr/bin/env bash
# The prepared GPU check (performance.md, "How GPU figures are used"): one call on a lent H200.
#
#   0. compile first: every Triton kernel compiled for sm_90 at V4-Flash decode shapes with this machine's
#      Triton and ptxas (tools/kernel_check.py, ~15 s; CI runs it for sm_90 and sm_80 without a GPU), so a
#      compile error or a spill shows here, not as a failed test     → $OUT/kernels.log, $OUT/kernels.json
#   1. correctness first: every @pytest.mark.gpu test (kernels at V4 shapes, bf16 cases included)
#      on CUDA with compiled kernels                                        → $OUT/tests.log
#   2. the per-component cost table of a random-weight V4-Flash proxy (tools/gpu_costs.py: its own
#      bf16-vs-fp32 forward check, then per-bucket µs of every component)  → $OUT/costs.json,
#                                                     $OUT/cost_gpu.json (CostTable), $OUT/costs.log
#   3. end-to-end decoding of the embedded nano model (tools/gpu_e2e.py): ar / mtp / dspark at C = 1
#      and 8, eager and CUDA-graph rounds, per-user tokens/s and the ratio to ar  → $OUT/e2e.json, e2e.log
#   4. a short summary table, printed last.
#
# Offline and installs nothing: the checkout is put on PYTHONPATH and the machine's own python3
# (torch, triton, pytest, hypothesis) is used. About 6 minutes at most: TEST_TIMEOUT (120 s),
# E2E_TIMEOUT (75 s) and COST_TIMEOUT (what is left of 270 s after the tests, within 100..240 s). Figures are reported,
# not gates; the exit status is non-zero when a step failed, after the summary.
#
#   COMMIT=$(git rev-parse HEAD) bash tools/gpu_check.sh     # OUT defaults to bench/results/gpu
#   SMOKE=1 OUT=/tmp/gpu bash tools/gpu_check.sh             # CPU rehearsal: one test file, tiny shapes
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
# Kernels must compile for the GPU; tests/conftest.py sets the interpreter itself when there is no GPU.
unset TRITON_INTERPRET
OUT="${OUT:-bench/results/gpu}"
PY="${PYTHON:-python3}"
SMOKE="${SMOKE:-0}"
TEST_TIMEOUT="${TEST_TIMEOUT:-120}"
E2E_TIMEOUT="${E2E_TIMEOUT:-75}"
mkdir -p "$OUT"
start=$SECONDS

echo "== gpu_check: $(date -u +%FT%TZ), commit ${COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.used,memory.total \
    --format=csv,noheader || true
if ! "$PY" -c "import sys, torch; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', \
torch.version.cuda, 'gpu', torch.cuda.is_available()); sys.exit(not torch.cuda.is_available())" && [[ "$SMOKE" != 1 ]]
then
    echo "no CUDA device: this check is for the GPU machine (SMOKE=1 rehearses it on CPU)" >&2
    exit 2
fi

# ---- 0. every kernel compiled for sm_90 (registers, spills, shared memory, grid, waves; a figure, not a gate:
# the gates run in CI). SMOKE compiles one kernel and keeps its output on the console.
echo "== kernel compile check (tools/kernel_check.py)"
set +e
if [[ "$SMOKE" == 1 ]]; then
    timeout -k 10 120 "$PY" tools/kernel_check.py --tier fast --arch 90 --only compressor
    kernels_rc=$?
else
    timeout -k 10 120 "$PY" tools/kernel_check.py --tier fast --arch 90 --json "$OUT/kernels.json" >"$OUT/kernels.log" 2>&1
    kernels_rc=$?
    tail -n 6 "$OUT/kernels.log"
fi
set -e
echo "== kernel check done in $((SECONDS - start)) s (status $kernels_rc)"

# ---- 1. tests: every @pytest.mark.gpu test (the kernels at V4 shapes, bf16 included) on CUDA.
# The other kernel tests build CPU tensors for the Triton interpreter, so they are CPU-tier tests.
if [[ "$SMOKE" == 1 ]]; then
    tests=(tests/ops/test_rejection.py)
    mark="not extended"
else
    mapfile -t tests < <(grep -rl "mark.gpu" tests --include='test_*.py' | sort)
    mark=gpu
    # Files that need HF's DeepSeek-V4 cannot even be collected where transformers lacks it.
    if ! "$PY" -c "import transformers; transformers.DeepseekV4Config" 2>/dev/null; then
        mapfile -t tests < <(for f in "${tests[@]}"; do grep -L "transformers\|hf_reference" "$f" || true; done)
        echo "transformers without DeepseekV4: HF-dependent GPU test files left out"
    fi
fi
set +e
{
    if ((${#tests[@]} == 0)); then
        echo "no GPU test files"
        exit 1
    fi
    timeout -k 10 "$TEST_TIMEOUT" "$PY" -m pytest -q -rfEs --durations=8 -m "$mark" "${tests[@]}"
    rc=$?
    echo "tests exit status: $rc"
    exit $rc
} 2>&1 | tee "$OUT/tests.log"
tests_rc=${PIPESTATUS[0]}
set -e
echo "== tests done in $((SECONDS - start)) s (status $tests_rc)"

# ---- 2. cost table: what is left of ~270 s, at most 240 s (gpu_costs stops starting new
# measurements 30 s before its hard limit, so its JSON is complete when it ends)
if [[ -z "${COST_TIMEOUT:-}" ]]; then
    COST_TIMEOUT=$((270 - (SECONDS - start)))
    ((COST_TIMEOUT > 240)) && COST_TIMEOUT=240
    ((COST_TIMEOUT < 100)) && COST_TIMEOUT=100
fi
cost_args=(--out "$OUT" --tests-log "$OUT/tests.log" --budget-s "$((COST_TIMEOUT - 30))")
[[ -n "${COMMIT:-}" ]] && cost_args+=(--commit "$COMMIT")
[[ "$SMOKE" == 1 ]] && cost_args+=(--smoke --device cpu)
echo "== cost table (at most $COST_TIMEOUT s; progress in $OUT/costs.log)"
set +e
timeout -k 10 "$COST_TIMEOUT" "$PY" tools/gpu_costs.py "${cost_args[@]}" >"$OUT/costs.log" 2>&1
costs_rc=$?
set -e
rm -f "$OUT/costs.tmp"
if ((costs_rc != 0)); then
    echo "-- tools/gpu_costs.py exited with $costs_rc (124: timed out); the end of its log:"
    tail -n 25 "$OUT/costs.log"
fi

# ---- 3. end to end: the nano model through the engine, eager and graphed (figures, not gates)
e2e_args=(--out "$OUT" --budget-s "$((E2E_TIMEOUT - 20))")
[[ "$SMOKE" == 1 ]] && e2e_args+=(--device cpu --dtype fp32 --graphs off --concurrency 1 --methods ar,dspark --tokens 24)
echo "== end to end (at most $E2E_TIMEOUT s)"
set +e
timeout -k 10 "$E2E_TIMEOUT" "$PY" tools/gpu_e2e.py "${e2e_args[@]}" >"$OUT/e2e.log" 2>&1
e2e_rc=$?
set -e

# ---- 4. summary, last
echo
echo "== gpu_check summary ($((SECONDS - start)) s; tests status $tests_rc, costs status $costs_rc, kernel check status $kernels_rc)"
if ((costs_rc == 0)); then
    sed -n '/^GPU cost table:/,$p' "$OUT/costs.log"  # the summary gpu_costs printed last
elif [[ -f "$OUT/costs.json" ]]; then
    "$PY" tools/gpu_costs.py --summarize "$OUT/costs.json" || true
else
    echo "no costs.json written"
fi
echo "-- end to end (status $e2e_rc):"
tail -n 16 "$OUT/e2e.log"
ls -l "$OUT"
[[ $tests_rc == 0 && $costs_rc == 0 && $e2e_rc == 0 ]]
