#include <c10/core/DeviceGuard.h>
#include <torch/library.h>

#include "cuda/memsave_maxpool.h"
#include "ops/common.h"
#include "ops/cuda_stream.h"
#include "ops/memsave_maxpool.h"

namespace slimtune {
namespace {

at::Tensor memsave_maxpool_compact_cuda(const at::Tensor& indices, at::IntArrayRef input_size,
                                        at::IntArrayRef kernel_size, at::IntArrayRef stride, at::IntArrayRef padding,
                                        at::IntArrayRef dilation) {
  constexpr const char* op = "memsave_maxpool_compact";
  const auto g = check_maxpool_compact(indices, input_size, kernel_size, stride, padding, dilation);
  c10::DeviceGuard guard(indices.device());
  const at::Tensor idx = indices.contiguous();
  at::Tensor offsets = at::empty(idx.sizes(), idx.options().dtype(at::kChar));
  check_cuda_status(cuda::memsave_maxpool_compact(idx.const_data_ptr<int64_t>(),
                                                  static_cast<signed char*>(offsets.data_ptr()), g,
                                                  current_cuda_stream(indices.device())),
                    op);
  return offsets;
}

at::Tensor memsave_maxpool_backward_cuda(const at::Tensor& grad, const at::Tensor& offsets, at::IntArrayRef input_size,
                                         at::IntArrayRef kernel_size, at::IntArrayRef stride, at::IntArrayRef padding,
                                         at::IntArrayRef dilation) {
  constexpr const char* op = "memsave_maxpool_backward";
  const auto g = check_maxpool_backward(grad, offsets, input_size, kernel_size, stride, padding, dilation);
  c10::DeviceGuard guard(grad.device());
  const auto acc = grad.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor buf = at::zeros(input_size, grad.options().dtype(acc));
  const at::Tensor gc = grad.contiguous();
  const at::Tensor oc = offsets.contiguous();
  check_cuda_status(cuda::memsave_maxpool_backward(gc.data_ptr(), to_kernel_dtype(gc.scalar_type()),
                                                   static_cast<const signed char*>(oc.data_ptr()), buf.data_ptr(), g,
                                                   current_cuda_stream(grad.device())),
                    op);
  return buf.to(grad.scalar_type());
}

}  // namespace
}  // namespace slimtune

TORCH_LIBRARY_IMPL(slimtune, CUDA, m) {
  m.impl("memsave_maxpool_compact", &slimtune::memsave_maxpool_compact_cuda);
  m.impl("memsave_maxpool_backward", &slimtune::memsave_maxpool_backward_cuda);
}
