// Plain types shared by the torch-free CUDA kernels and the torch-facing glue.
// Nothing here may include torch or CUDA headers: the glue is compiled by the host
// compiler and the kernels by nvcc without torch.
#pragma once
#include <cstdint>

namespace slimtune {
namespace cuda {

enum class DType : int { Float32 = 0, Float16 = 1, BFloat16 = 2, Float64 = 3 };
enum class IndexType : int { Int32 = 0, Int64 = 1 };

// Every launcher returns 0 on success or the cudaError_t of the failed launch.
using Status = int;

// cudaGetErrorString, reachable from code that does not include CUDA headers.
const char* error_string(Status status);

}  // namespace cuda
}  // namespace slimtune
