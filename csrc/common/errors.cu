#include <cuda_runtime.h>

#include "common/types.h"

namespace slimtune {

const char* error_string(Status status) { return cudaGetErrorString(static_cast<cudaError_t>(status)); }

}  // namespace slimtune
