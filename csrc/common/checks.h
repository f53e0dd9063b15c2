// Argument checks and dtype conversions shared by the torch-facing glue of every family.
#pragma once
#include <ATen/ATen.h>

#include "common/types.h"

namespace torch {
class Library;
}

namespace slimtune {

// Error messages always name the argument, so a user can tell which input is wrong.
#define SLIMTUNE_CHECK_ARG(cond, op, arg, ...) \
  TORCH_CHECK(cond, "slimtune.", op, ": argument '", arg, "' ", __VA_ARGS__)

inline bool is_float_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16 || t == at::kDouble;
}

DType to_kernel_dtype(at::ScalarType t);
at::ScalarType to_scalar_type(DType t);
IndexType to_kernel_index(at::ScalarType t);

// The accumulation dtype (common/acc.h) of a float storage dtype.
at::ScalarType acc_scalar_type(at::ScalarType storage);

// Registers, for the ops named, a check that runs before any backend (the BackendSelect key)
// and throws naming the argument unless every tensor argument (lists and optionals included) is
// on one device. Without it a meta tensor among CPU arguments would send the whole call to the
// meta (fake) kernel, which returns uninitialized memory or silently does nothing.
void register_one_device_check(torch::Library& m, c10::ArrayRef<const char*> ops);

void check_same_device(const char* op, const at::Tensor& ref, const char* ref_name, const at::Tensor& t,
                       const char* name);

// Flat indices into a tensor of `numel` elements must be 1-D int32/int64, in range and
// unique; throws naming `name` otherwise. CPU: one pass (a sort only for unsorted input);
// other devices: ATen reductions with one host sync.
void check_flat_indices(const char* op, const at::Tensor& indices, const char* name, int64_t numel);

// A dropout seed: a one-element int64 tensor on x's device (so a GPU kernel reads it from device
// memory, without a host sync); throws naming 'seed' otherwise.
void check_seed_tensor(const char* op, const at::Tensor& x, const at::Tensor& seed, const char* x_name = "x");

// A tensor of tokens (..., d) as (tokens, d), tokens the product of the leading sizes: reshape's -1
// cannot infer them when d is 0. A view where reshape can make one.
int64_t token_count(const at::Tensor& t);
at::Tensor as_token_rows(const at::Tensor& t);
// a and b (dim >= 1) have the same sizes but the last: the same tokens.
bool same_tokens(const at::Tensor& a, const at::Tensor& b);

// True when no element is NaN or infinite. CPU: one allocation-free pass; elsewhere one sync.
bool all_finite(const at::Tensor& t);

}  // namespace slimtune
