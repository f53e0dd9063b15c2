#include <c10/core/DeviceGuard.h>
#include <torch/library.h>

#include "cuda/sparse_delta_merge.h"
#include "ops/common.h"
#include "ops/cuda_stream.h"
#include "ops/sparse_delta_merge.h"

namespace slimtune {
namespace {

void sparse_delta_merge_cuda(at::Tensor weight, const at::Tensor& indices, const at::Tensor& values, double alpha) {
  check_sparse_delta_merge(weight, indices, values, alpha);
  c10::DeviceGuard guard(weight.device());
  const at::Tensor idx = indices.contiguous();
  const at::Tensor val = values.contiguous();
  check_cuda_status(cuda::sparse_delta_merge(weight.data_ptr(), to_kernel_dtype(weight.scalar_type()), idx.data_ptr(),
                                             to_kernel_index(idx.scalar_type()), val.data_ptr(),
                                             to_kernel_dtype(val.scalar_type()), idx.numel(), alpha,
                                             current_cuda_stream(weight.device())),
                    "sparse_delta_merge_");
}

}  // namespace
}  // namespace slimtune

TORCH_LIBRARY_IMPL(slimtune, CUDA, m) {
  m.impl("sparse_delta_merge_", &slimtune::sparse_delta_merge_cuda);
}
