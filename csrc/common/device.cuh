// Device-side helpers shared by the CUDA kernels: storage <-> accumulator conversions, grid
// sizing and dtype dispatch. CUDA headers and common/ only (no torch).
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "common/acc.h"
#include "common/launch.cuh"
#include "common/types.h"

namespace slimtune {

static_assert(kInvalidValue == static_cast<Status>(cudaErrorInvalidValue), "Status codes are cudaError_t values");

template <typename T>
__device__ __forceinline__ float to_float(T v) { return static_cast<float>(v); }
template <>
__device__ __forceinline__ float to_float<__half>(__half v) { return __half2float(v); }
template <>
__device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v) { return static_cast<T>(v); }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

template <typename T>
__device__ __forceinline__ acc_t<T> to_acc(T v) { return to_float(v); }
template <>
__device__ __forceinline__ double to_acc<double>(double v) { return v; }
template <typename T>
__device__ __forceinline__ T from_acc(acc_t<T> v) { return from_float<T>(v); }
template <>
__device__ __forceinline__ double from_acc<double>(double v) { return v; }

// Blocks for a grid-stride loop over n items, capped (the loops cover the rest).
inline unsigned int blocks_for(int64_t n, int threads, unsigned int cap = 65535u * 32u) {
  int64_t b = (n + threads - 1) / threads;
  if (b < 1) b = 1;
  return static_cast<unsigned int>(b > cap ? cap : b);
}

// The GPU's 16-bit storage types, for dispatch_storage (common/types.h).
struct CudaFloats {
  using Half = __half;
  using BFloat16 = __nv_bfloat16;
};

// Calls f(T{}) with the storage type that `dtype` names.
template <typename F>
Status dispatch_float(DType dtype, F&& f) {
  return dispatch_storage<CudaFloats>(dtype, static_cast<F&&>(f));
}

}  // namespace slimtune
