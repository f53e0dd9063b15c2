// Sparse-delta kernels: a sparse delta Δ over a (rows, cols) weight given by flat row-major
// `indices` (int32/int64) and `values` (the weight's dtype or float32); the row kernels also
// take per-row offsets `rowptr` (int64, rows + 1) into sorted indices. Inputs are contiguous
// and validated by the glue (sparse_delta.cpp). Torch-free: nvcc and the host compiler both
// read this header. Every entry takes its params and a stream (a cudaStream_t; ignored on CPU).
#pragma once
#include <cstdint>

#include "common/types.h"

namespace slimtune {
namespace sparse_delta {

// weight[indices[k]] += alpha * values[k] for k < n, summed in the accumulation type and
// rounded once. Indices are in range and unique, so no two k write one element.
struct MergeParams {
  void* weight;
  DType weight_dtype;
  const void* indices;
  IndexType index_type;
  const void* values;
  DType value_dtype;
  int64_t n;
  double alpha;
};

// The CSR delta of a rows×cols weight and the T tokens that both SpMM directions multiply it with
// (dtype: the dense operands' dtype).
struct SpmmOperands {
  DType dtype;
  const void* indices;
  IndexType index_type;
  const int64_t* rowptr;
  const void* values;
  DType value_dtype;
  int64_t T, rows, cols;
};

// The delta term of the forward: out[t, r] = base + bias[r] + Σ_{k in row r} values[k] · x[t, col_k]
// for t < T, rounded once to dtype (x, bias, out: dtype; bias may be null). Per (t, r) the entries are
// summed in the accumulation type from 0 in row order, then the bias and the base are added once,
// whatever T is, so a token's result does not depend on its batch. Every element is written (rows
// without entries too). base: out's own value where `accumulate` (out then holds x·W0ᵀ; only where
// dtype is its own accumulation type, float32/float64), else 0: a bf16/fp16 output holds the delta
// term alone, and the glue adds x·W0ᵀ into it by a GEMM with beta 1, which adds out in float32 and
// rounds once (no T×rows float32 intermediate).
struct SpmmParams : SpmmOperands {
  const void* bias;
  const void* x;
  void* out;
  bool accumulate;
};

// The delta term of dx: out[t, c] = base + Σ_{k with col_k = c} values[k] · g[t, row_k] (g: T×rows and
// out: T×cols in dtype; base as in SpmmParams, without a bias), per (t, c) summed from 0 in ascending
// row order and rounded once, so every backend gives the same bits up to the compiler's contraction
// of a·b + c.
struct SpmmTParams : SpmmOperands {
  const void* g;
  void* out;
  bool accumulate;
  // CUDA: spmm_t_starts_cuda(rows, cols) int32 slots of workspace, where the kernel writes where each
  // row's entries of each group of kSpmmTColumns columns begin. The CPU kernel takes none (null).
  int32_t* starts;
};

// Output columns per CUDA SpMMᵀ tile (see spmm_t_starts_cuda).
constexpr int64_t kSpmmTColumns = 128;

// out[k] = Σ_t a[t, row_k] · b[t, col_k] (a: T×rows, b: T×cols, one dtype) for k < K, in the
// accumulation type (the dtype of `out`). Deterministic: partial sums are added in a fixed order.
// CUDA splits the tokens into `chunks` slices whose partial sums go to `workspace` (chunks × K
// accumulators), reduced in slice order; the CPU kernel needs no workspace (chunks 0).
struct SddmmParams {
  const void* a;
  const void* b;
  DType dtype;
  const void* indices;
  IndexType index_type;
  const int64_t* rowptr;
  int64_t K, T, rows, cols;
  void* workspace;
  int64_t chunks;
  void* out;
};

// Layout check on the device: *first_bad (set to K + rows + 1 by the caller) becomes the smallest
// position that breaks the layout, k < K for an index (out of range, not above its predecessor,
// outside its row's rowptr span) and K + r for rowptr[r] (rowptr[0] != 0, rowptr[rows] != K, or a
// drop). Reads nothing out of bounds whatever the inputs hold.
struct ValidateParams {
  const void* indices;
  IndexType index_type;
  const int64_t* rowptr;
  int64_t K, rows, cols;
  int64_t* first_bad;
};

// Calls f(V{}) with the values' storage type: the operands' X, or float32 master values.
template <typename X, typename F>
Status dispatch_values(DType value_dtype, DType dtype, F&& f) {
  if (value_dtype == dtype) return f(X{});
  if (value_dtype == DType::Float32) return f(float{});
  return kInvalidValue;
}

// Calls f(X{}, I{}, V{}) with a delta's three types: the dense storage type X that `dtype` names
// (Floats: the backend's 16-bit types, see dispatch_storage), the index type and the values' V.
template <typename Floats, typename F>
Status dispatch_delta(DType dtype, IndexType index_type, DType value_dtype, F&& f) {
  return dispatch_storage<Floats>(dtype, [&](auto x_tag) {
    return dispatch_index(index_type, [&](auto i_tag) {
      return dispatch_values<decltype(x_tag)>(value_dtype, dtype, [&](auto v_tag) { return f(x_tag, i_tag, v_tag); });
    });
  });
}

SLIMTUNE_KERNEL_ENTRY(merge, MergeParams);
SLIMTUNE_KERNEL_ENTRY(spmm, SpmmParams);
SLIMTUNE_KERNEL_ENTRY(spmm_t, SpmmTParams);
SLIMTUNE_KERNEL_ENTRY(sddmm, SddmmParams);
// Workspace slots of spmm_t_cuda: a start per row and column group, and each row's end.
inline int64_t spmm_t_starts_cuda(int64_t rows, int64_t cols) {
  return rows * ((cols + kSpmmTColumns - 1) / kSpmmTColumns + 1);
}
// CUDA only (the CPU scans the indices on the host).
Status validate_cuda(const ValidateParams& p, void* stream);

}  // namespace sparse_delta
}  // namespace slimtune
