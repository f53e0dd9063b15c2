#!/usr/bin/env bash
# Compiles every CUDA kernel with nvcc (sm_80 and sm_90) and syntax-checks the CUDA glue
# against the installed torch's headers, so both halves of the CUDA path are compiled on a
# machine without a GPU or a CUDA build of torch.
# Usage: .ci/compile_cuda.sh [PYTHON]   (PYTHON: an interpreter with torch, for the glue check)
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${1:-python3}"
NVCC="${NVCC:-$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)}"
[ -x "$NVCC" ] || { echo "compile_cuda: nvcc not found (set NVCC)"; exit 1; }
out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT
n=0
for f in csrc/cuda/*.cu; do
  "$NVCC" -c -std=c++17 -O3 -Icsrc --expt-relaxed-constexpr -Werror all-warnings \
    -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90,code=sm_90 \
    "$f" -o "$out/$(basename "$f").o"
  echo "nvcc ok: $f"
  n=$((n + 1))
done
torch_root="$("$PY" -c 'import os, torch; print(os.path.dirname(torch.__file__))')"
for f in csrc/ops/*_cuda.cpp; do
  [ -e "$f" ] || continue
  c++ -std=c++17 -fsyntax-only -Wall -Icsrc -isystem "$torch_root/include" \
    -isystem "$torch_root/include/torch/csrc/api/include" "$f"
  echo "glue ok: $f"
done
echo "compile_cuda: $n CUDA sources compiled with $("$NVCC" --version | tail -1)"
