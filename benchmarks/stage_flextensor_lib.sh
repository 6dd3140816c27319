#!/usr/bin/env bash
# Download NVIDIA's flextensor library (PyPI flextensor 0.5.0) and the dependencies the GPU
# machines' image lacks into .whl/, for flextensor_bench.py's flextensor_lib variant.
# Run here (it needs the network), from the repository root; .whl/ is git-ignored, so the
# GPU run carries it along and installs it beside vLLM:
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
set -euo pipefail
DEST="${1:-.whl}"
mkdir -p "$DEST"
PLAT="--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
 --platform manylinux_2_5_x86_64 --platform manylinux1_x86_64"
# flextensor's Requires-Dist, less what the image (torch, numpy, scipy, psutil, pyyaml) and
# the vLLM bundle (pydantic) already hold.
for req in flextensor==0.5.0 "beartype~=0.21" "proxytypes3>=1.0.1" "posix-ipc~=1.3.0" \
           "shared-memory-dict~=0.7.2"; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp $PLAT -d "$DEST" "$req"
done
cat > "$DEST/README.txt" <<TXT
NVIDIA flextensor 0.5.0 and its dependencies missing from the GPU image (cp312, x86_64),
made by benchmarks/stage_flextensor_lib.sh. Install on the GPU machine with
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
TXT
ls -l "$DEST"
