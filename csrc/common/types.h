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

namespace slimtune {

enum class DType : int { Float32 = 0, Float16 = 1, BFloat16 = 2, Float64 = 3 };
enum class IndexType : int { Int32 = 0, Int64 = 1 };

// Every kernel entry point returns 0 on success, else an error code (a cudaError_t on CUDA).
using Status = int;
constexpr Status kSuccess = 0;
// A parameter a kernel cannot handle (equal to cudaErrorInvalidValue).
constexpr Status kInvalidValue = 1;

// cudaGetErrorString, reachable from code that does not include CUDA headers (common/errors.cu).
const char* error_string(Status status);

}  // namespace slimtune
