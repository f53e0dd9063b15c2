// Plain types shared by the torch-free kernels (CPU and CUDA) and the torch-facing glue.
// Nothing here may include torch or CUDA headers: nvcc compiles the kernels without torch,
// and the host compiler sees this file from every glue and CPU kernel file.
#pragma once
#include <cstdint>

// Functions callable from host and device code (nvcc), plain inline functions elsewhere.
#ifdef __CUDACC__
#define SLIMTUNE_HD __host__ __device__ __forceinline__
#else
#define SLIMTUNE_HD inline
#endif

// Declares a kernel entry point's two forms, name##_cpu and name##_cuda: one params struct,
// a stream (a cudaStream_t; ignored on the CPU), a Status back.
#define SLIMTUNE_KERNEL_ENTRY(name, Params)          \
  Status name##_cpu(const Params& p, void* stream);  \
  Status name##_cuda(const Params& p, void* stream)

namespace slimtune {

enum class DType : int { Float32 = 0, Float16 = 1, BFloat16 = 2, Float64 = 3 };
enum class IndexType : int { Int32 = 0, Int64 = 1 };

// Every kernel entry point returns 0 on success, else an error code (a cudaError_t on CUDA).
using Status = int;
constexpr Status kSuccess = 0;
// A parameter a kernel cannot handle (equal to cudaErrorInvalidValue).
constexpr Status kInvalidValue = 1;

// A kernel entry point (SLIMTUNE_KERNEL_ENTRY) as a value, for the glue's table of one
// backend's kernels.
template <typename Params>
using KernelEntry = Status (*)(const Params&, void*);

// cudaGetErrorString, reachable from code that does not include CUDA headers (common/errors.cu).
const char* error_string(Status status);

// Calls f(T{}) with the storage type that `dtype` names. The 16-bit types differ by backend
// (c10's on the CPU, CUDA's on the GPU): Floats names them as Floats::Half and Floats::BFloat16.
template <typename Floats, typename F>
Status dispatch_storage(DType dtype, F&& f) {
  switch (dtype) {
    case DType::Float32: return f(float{});
    case DType::Float16: return f(typename Floats::Half{});
    case DType::BFloat16: return f(typename Floats::BFloat16{});
    case DType::Float64: return f(double{});
  }
  return kInvalidValue;
}

// Calls f(I{}) with the index type that `itype` names (the same on every backend).
template <typename F>
Status dispatch_index(IndexType itype, F&& f) {
  switch (itype) {
    case IndexType::Int32: return f(int32_t{});
    case IndexType::Int64: return f(int64_t{});
  }
  return kInvalidValue;
}

}  // namespace slimtune
