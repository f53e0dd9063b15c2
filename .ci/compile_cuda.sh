#!/usr/bin/env bash
# Compiles every CUDA kernel (csrc/**/*.cu) with nvcc (sm_80 and sm_90, warnings as errors) and
# syntax-checks every glue file's CUDA registration (-DSLIMTUNE_WITH_CUDA) against the installed
# torch's headers, so both halves of the CUDA path are compiled on a machine without a GPU or a
# CUDA build of torch. Last, the host-emulation contract of common/launch.cuh and
# common/backend.h: every .cu and glue file must also parse for the host compiler with
# -DSLIMTUNE_HOST_EMULATION, against the emulator's own headers (tests/cuda_host/include).
# Usage: .ci/compile_cuda.sh [PYTHON]   (PYTHON: an interpreter with torch, for the glue check)
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${1:-python3}"
# shellcheck source=/dev/null  # .ci/_common.sh, checked on its own
source .ci/_common.sh
find_nvcc compile_cuda
out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT
n=0
while IFS= read -r f; do
  "$NVCC" -c -std=c++17 -O3 -Icsrc --expt-relaxed-constexpr -Werror all-warnings \
    -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90,code=sm_90 \
    "$f" -o "$out/$(echo "$f" | tr / _).o"
  echo "nvcc ok: $f"
  n=$((n + 1))
done < <(find csrc -name '*.cu' | sort)
torch_root="$("$PY" -c 'import os, torch; print(os.path.dirname(torch.__file__))')"
while IFS= read -r f; do
  c++ -std=c++17 -fsyntax-only -Wall -DSLIMTUNE_WITH_CUDA -Icsrc -isystem "$torch_root/include" \
    -isystem "$torch_root/include/torch/csrc/api/include" "$f"
  echo "glue ok: $f"
done < <(grep -l -r --include='*.cpp' 'SLIMTUNE_WITH_CUDA\|SLIMTUNE_HAS_GPU' csrc | grep -v '^csrc/module.cpp$' | sort)
cuda_inc="${CUDA_HOME:-/usr/local/cuda}/include"
[ -f "$cuda_inc/cuda_bf16.h" ] || cuda_inc="$(dirname "$(dirname "$(readlink -f "$NVCC")")")/include"
while IFS= read -r f; do
  c++ -std=c++17 -fsyntax-only -w -DSLIMTUNE_HOST_EMULATION -Icsrc -Itests/cuda_host/include \
    -idirafter "$cuda_inc" -idirafter "$cuda_inc/cccl" -isystem "$torch_root/include" \
    -isystem "$torch_root/include/torch/csrc/api/include" -x c++ "$f"
  echo "host emulation ok: $f"
done < <(find csrc -name '*.cu' | sort; grep -l -r --include='*.cpp' 'SLIMTUNE_HAS_GPU\|SLIMTUNE_HOST_EMULATION' csrc | sort)
echo "compile_cuda: $n CUDA sources compiled with $("$NVCC" --version | tail -1)"
