#pragma once
#include "cuda/types.h"

namespace slimtune {
namespace cuda {

// weight[indices[k]] += alpha * values[k] for k < n. Indices are validated (in range,
// unique) by the caller, so no atomics are needed. `stream` is a cudaStream_t.
Status sparse_delta_merge(void* weight, DType weight_dtype, const void* indices, IndexType index_type,
                          const void* values, DType value_dtype, int64_t n, double alpha, void* stream);

}  // namespace cuda
}  // namespace slimtune
