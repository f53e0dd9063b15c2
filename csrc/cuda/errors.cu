#include <cuda_runtime.h>

#include "cuda/types.h"

namespace slimtune {
namespace cuda {

const char* error_string(Status status) {
  return cudaGetErrorString(static_cast<cudaError_t>(status));
}

}  // namespace cuda
}  // namespace slimtune
