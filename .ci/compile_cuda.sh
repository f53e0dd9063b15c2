#!/usr/bin/env bash
# Compiles every CUDA kernel (csrc/**/*.cu) with nvcc (sm_80 and sm_90, warnings as errors) and
# syntax-checks every glue file's CUDA registration (-DSLIMTUNE_WITH_CUDA) against the installed
# torch's headers, so both halves of the CUDA path are compiled on a machine without a GPU or a
# CUDA build of torch. Last, the host-emulation contract of common/launch.cuh and
# common/backend.h: every .cu and glue file must also parse for the host compiler with
# -DSLIMTUNE_HOST_EMULATION, against a minimal stand-in for the emulator's runtime header.
# Usage: .ci/compile_cuda.sh [PYTHON]   (PYTHON: an interpreter with torch, for the glue check)
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${1:-python3}"
NVCC="${NVCC:-$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)}"
[ -x "$NVCC" ] || { echo "compile_cuda: nvcc not found (set NVCC)"; exit 1; }
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
emu="$out/emu"
mkdir -p "$emu/slimtune_emu"
cat > "$emu/cuda_runtime.h" <<'H'
#pragma once
#include <algorithm>
#include <cstddef>
#define __global__
#define __device__
#define __host__
#define __shared__
#define __forceinline__ inline
struct dim3 { unsigned x, y, z; dim3(unsigned a = 1, unsigned b = 1, unsigned c = 1) : x(a), y(b), z(c) {} };
struct uint3 { unsigned x, y, z; };
typedef struct CUstream_st* cudaStream_t;
enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidValue = 1 };
const char* cudaGetErrorString(cudaError_t);
extern thread_local uint3 threadIdx, blockIdx;
extern thread_local dim3 blockDim, gridDim;
template <class T> T atomicAdd(T* p, T v);
using std::max;
using std::min;
H
cat > "$emu/cuda_fp16.h" <<'H'
#pragma once
struct __half { unsigned short x; };
float __half2float(__half);
__half __float2half_rn(float);
H
cat > "$emu/cuda_bf16.h" <<'H'
#pragma once
struct __nv_bfloat16 { unsigned short x; };
float __bfloat162float(__nv_bfloat16);
__nv_bfloat16 __float2bfloat16_rn(float);
H
cat > "$emu/slimtune_emu/runtime.h" <<'H'
#pragma once
#include <cuda_runtime.h>
namespace slimtune_emu {
template <typename... K, typename... A>
int launch(void (*)(K...), dim3, dim3, size_t, cudaStream_t, A&&...);
template <typename T> T* dynamic_smem();
}
H
while IFS= read -r f; do
  c++ -std=c++17 -fsyntax-only -Wall -DSLIMTUNE_HOST_EMULATION -Icsrc -I"$emu" -isystem "$torch_root/include" \
    -isystem "$torch_root/include/torch/csrc/api/include" -x c++ "$f"
  echo "host emulation ok: $f"
done < <(find csrc -name '*.cu' | sort; grep -l -r --include='*.cpp' 'SLIMTUNE_HAS_GPU\|SLIMTUNE_HOST_EMULATION' csrc | sort)
echo "compile_cuda: $n CUDA sources compiled with $("$NVCC" --version | tail -1)"
