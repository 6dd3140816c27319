#!/usr/bin/env bash
# GPU check, run ON a lent GPU machine from the repository root, after the vLLM 0.26 bundle
# made by ../shared/gpu/stage-vllm.sh has been copied to /tmp/stage (see its run-order.txt).
# Installs this project beside vLLM 0.26 and runs the GPU-marked tests; JSON results and the
# pytest log land in $OUT (or ./gpu-check-out).
set -euo pipefail
OUT="${OUT:-$PWD/gpu-check-out}"; mkdir -p "$OUT"
bash .gpu-carry/install.sh
export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
python3 -m pip install -q --upgrade --no-deps --no-build-isolation --no-compile --target /tmp/site . >/dev/null
export DWDP_RESULTS_DIR="$OUT" DWDP_RESULTS_COMMAND="bash scripts/gpu-check.sh ${*:-}"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/nvidia-smi.txt"
set +e
python3 -m pytest -m "gpu or gpu_2" -v -rA "${@:-tests}" 2>&1 | tee "$OUT/pytest.log"
rc=${PIPESTATUS[0]}
set -e
# Keep the engine logs of the GPU runs (plugin loading is visible there).
for f in /tmp/vllm-dwdp-eq-*/plugin*.log /tmp/vllm-dwdp-eq-*/rank0.log; do [ -f "$f" ] && cp "$f" "$OUT/" || true; done
exit "$rc"
