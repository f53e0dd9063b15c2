// Checks and conversions shared by the torch-facing glue of every op.
#pragma once
#include <ATen/ATen.h>

#include "cuda/types.h"

namespace slimtune {

// Error messages always name the argument, so a user can tell which input is wrong.
#define SLIMTUNE_CHECK_ARG(cond, op, arg, ...) \
  TORCH_CHECK(cond, "slimtune.", op, ": argument '", arg, "' ", __VA_ARGS__)

inline bool is_float_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16 || t == at::kDouble;
}

inline cuda::DType to_kernel_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return cuda::DType::Float32;
    case at::kHalf: return cuda::DType::Float16;
    case at::kBFloat16: return cuda::DType::BFloat16;
    case at::kDouble: return cuda::DType::Float64;
    default: TORCH_CHECK(false, "slimtune: unsupported dtype ", t);
  }
}

inline cuda::IndexType to_kernel_index(at::ScalarType t) {
  TORCH_CHECK(t == at::kInt || t == at::kLong, "slimtune: unsupported index dtype ", t);
  return t == at::kInt ? cuda::IndexType::Int32 : cuda::IndexType::Int64;
}

inline void check_same_device(const char* op, const at::Tensor& ref, const char* ref_name, const at::Tensor& t,
                              const char* name) {
  SLIMTUNE_CHECK_ARG(t.device() == ref.device(), op, name, "is on ", t.device(), " but '", ref_name, "' is on ",
                     ref.device());
}

// Flat indices into a tensor of `numel` elements must be 1-D int32/int64, in range and
// unique; throws naming `name` otherwise. CPU: one pass (a sort only for unsorted input);
// other devices: ATen reductions with one host sync.
void check_flat_indices(const char* op, const at::Tensor& indices, const char* name, int64_t numel);

// True when no element is NaN or infinite. CPU: one allocation-free pass; elsewhere one sync.
bool all_finite(const at::Tensor& t);

}  // namespace slimtune
