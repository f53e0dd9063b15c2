#include <c10/core/DeviceGuard.h>
#include <torch/library.h>

#include <tuple>

#include "cuda/memsave_bitmask.h"
#include "ops/common.h"
#include "ops/cuda_stream.h"
#include "ops/memsave_bitmask.h"

namespace slimtune {
namespace {

at::Tensor memsave_relu_mask_cuda(const at::Tensor& x) {
  check_memsave_relu_mask(x);
  c10::DeviceGuard guard(x.device());
  const at::Tensor xc = x.contiguous();
  at::Tensor mask = at::empty({memsave_mask_bytes(x.numel())}, x.options().dtype(at::kByte));
  check_cuda_status(cuda::memsave_relu_mask(xc.data_ptr(), to_kernel_dtype(xc.scalar_type()), xc.numel(),
                                            static_cast<unsigned char*>(mask.data_ptr()),
                                            current_cuda_stream(x.device())),
                    "memsave_relu_mask");
  return mask;
}

std::tuple<at::Tensor, at::Tensor> memsave_relu_cuda(const at::Tensor& x) {
  check_memsave_relu_mask(x);
  c10::DeviceGuard guard(x.device());
  const at::Tensor xc = x.contiguous();
  at::Tensor out = at::empty_like(xc, at::MemoryFormat::Contiguous);
  at::Tensor mask = at::empty({memsave_mask_bytes(x.numel())}, x.options().dtype(at::kByte));
  check_cuda_status(cuda::memsave_relu_forward(xc.data_ptr(), to_kernel_dtype(xc.scalar_type()), xc.numel(),
                                               out.data_ptr(), static_cast<unsigned char*>(mask.data_ptr()),
                                               current_cuda_stream(x.device())),
                    "memsave_relu");
  return {out, mask};
}

at::Tensor memsave_relu_backward_cuda(const at::Tensor& grad, const at::Tensor& mask) {
  check_memsave_relu_backward(grad, mask);
  c10::DeviceGuard guard(grad.device());
  const at::Tensor gc = grad.contiguous();
  at::Tensor out = at::empty_like(gc, at::MemoryFormat::Contiguous);
  check_cuda_status(cuda::memsave_relu_backward(gc.data_ptr(), to_kernel_dtype(gc.scalar_type()), gc.numel(),
                                                static_cast<const unsigned char*>(mask.data_ptr()), out.data_ptr(),
                                                current_cuda_stream(grad.device())),
                    "memsave_relu_backward");
  return out;
}

}  // namespace
}  // namespace slimtune

TORCH_LIBRARY_IMPL(slimtune, CUDA, m) {
  m.impl("memsave_relu", &slimtune::memsave_relu_cuda);
  m.impl("memsave_relu_mask", &slimtune::memsave_relu_mask_cuda);
  m.impl("memsave_relu_backward", &slimtune::memsave_relu_backward_cuda);
}
