#pragma once
#include "cuda/types.h"

namespace slimtune {
namespace cuda {

// Sparse delta Δ over a (rows, cols) weight: sorted flat `indices` (int32/int64), per-row
// offsets `rowptr` (int64, rows + 1), `values` of the operands' dtype or float32. Inputs are
// contiguous and validated by the caller. `stream` is a cudaStream_t.

// y[t, r] += Σ_{k in row r} values[k] · x[t, col_k] for t < T (x: T×cols, y: T×rows, same dtype).
Status sparse_delta_spmm(void* y, const void* x, DType dtype, const void* indices, IndexType index_type,
                         const int64_t* rowptr, const void* values, DType value_dtype, int64_t T, int64_t rows,
                         int64_t cols, void* stream);

// out[k] = Σ_t a[t, row_k] · b[t, col_k] (a: T×rows, b: T×cols, same dtype), accumulated in
// float32 (float64 for float64), reading a and b in their own dtype. Tokens are split into
// `chunks` slices whose partial sums go to `workspace` (chunks × K accumulators) and are then
// added in a fixed order: deterministic, no atomics, no host sync. `out` has the accumulator type.
Status sparse_delta_sddmm(const void* a, const void* b, DType dtype, const void* indices, IndexType index_type,
                          int64_t K, int64_t T, int64_t rows, int64_t cols, void* workspace, int64_t chunks,
                          void* out, void* stream);

}  // namespace cuda
}  // namespace slimtune
