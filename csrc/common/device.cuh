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

// A storage type's trip to and from its accumulator (common/acc.h): a plain cast, but for the
// 16-bit types, which have their own intrinsics (rounding to nearest even on the way back).
template <typename T>
struct AccConv {
  static __device__ __forceinline__ acc_t<T> to(T v) { return static_cast<acc_t<T>>(v); }
  static __device__ __forceinline__ T from(acc_t<T> v) { return static_cast<T>(v); }
};
template <>
struct AccConv<__half> {
  static __device__ __forceinline__ float to(__half v) { return __half2float(v); }
  static __device__ __forceinline__ __half from(float v) { return __float2half_rn(v); }
};
template <>
struct AccConv<__nv_bfloat16> {
  static __device__ __forceinline__ float to(__nv_bfloat16 v) { return __bfloat162float(v); }
  static __device__ __forceinline__ __nv_bfloat16 from(float v) { return __float2bfloat16_rn(v); }
};

template <typename T>
__device__ __forceinline__ acc_t<T> to_acc(T v) { return AccConv<T>::to(v); }
template <typename T>
__device__ __forceinline__ T from_acc(acc_t<T> v) { return AccConv<T>::from(v); }

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
