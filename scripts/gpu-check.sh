#!/usr/bin/env bash
# GPU check, run ON a GPU machine from the repository root, after the vLLM 0.26 bundle
# made by ../shared/gpu/stage-vllm.sh has been copied to /tmp/stage (see its run-order.txt).
# Installs this project beside vLLM 0.26 and runs the GPU-marked tests (arguments: pytest
# paths, default tests/). Then, if GPU_CHECK_AFTER is set, runs that command too (a
# benchmark). Everything lands in $OUT (or ./gpu-check-out): pytest.log, nvidia-smi.txt, the
# JSON results, and results.tar.gz with every result and engine log (the device returns at
# most 8 files). GPU_CHECK_PYTEST_TIMEOUT (s, default 420) bounds the tests so a slow run
# still comes back. The tests run with VLLM_DWDP_REQUIRE_GPU=1: a GPU test this machine cannot
# run (CUDA missing or broken, too few GPUs) fails instead of skipping, and any skipped test
# fails the check. gpu_2 tests are selected only where two GPUs are visible
# (GPU_CHECK_MARKERS overrides the selection).
set -euo pipefail
OUT="${OUT:-$PWD/gpu-check-out}"; mkdir -p "$OUT"
RES=/tmp/gpu-check-results; mkdir -p "$RES"
bash .gpu-carry/install.sh
export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
python3 -m pip install -q --upgrade --no-deps --no-build-isolation --no-compile --target /tmp/site . >/dev/null
export DWDP_RESULTS_DIR="$RES" DWDP_RESULTS_COMMAND="bash scripts/gpu-check.sh ${*:-}"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/nvidia-smi.txt"
ngpu=$(nvidia-smi --query-gpu=name --format=csv,noheader | grep -c . || true)
if [ "$ngpu" -ge 2 ]; then MARKERS_DEFAULT="gpu or gpu_2"; else MARKERS_DEFAULT="gpu and not gpu_2"; fi
export VLLM_DWDP_REQUIRE_GPU=1
pack() {
  # Keep the engine logs of the GPU runs (plugin loading is visible there).
  mkdir -p "$RES/logs"
  for d in /tmp/vllm-dwdp-eq-* /tmp/vllm-flextensor-eq-*; do [ -d "$d" ] && cp -r "$d" "$RES/logs/" || true; done
  tar -C "$RES" -czf "$OUT/results.tar.gz" . || true
  for f in "$RES"/*.json; do [ -f "$f" ] && cp "$f" "$OUT/" || true; done
}
trap pack EXIT
rc=0
if [ "${GPU_CHECK_SKIP_TESTS:-0}" != 1 ]; then
  set +e
  # --timeout: one stuck test fails alone and the summary (with tracebacks) still prints.
  timeout "${GPU_CHECK_PYTEST_TIMEOUT:-420}" python3 -m pytest -m "${GPU_CHECK_MARKERS:-$MARKERS_DEFAULT}" \
    -v -rA --tb=short --timeout="${GPU_CHECK_TEST_TIMEOUT:-240}" \
    "${@:-tests}" 2>&1 | tee "$OUT/pytest.log"
  rc=${PIPESTATUS[0]}
  set -e
  if grep -qE '^SKIPPED' "$OUT/pytest.log"; then
    echo "gpu-check: GPU tests were skipped (listed above as SKIPPED): failing" >&2
    [ "$rc" -eq 0 ] && rc=1
  fi
fi
if [ -n "${GPU_CHECK_AFTER:-}" ]; then
  set +e
  bash -c "$GPU_CHECK_AFTER" 2>&1 | tee "$RES/after.log"
  rc2=${PIPESTATUS[0]}
  set -e
  [ "$rc" -eq 0 ] && rc=$rc2
fi
exit "$rc"
