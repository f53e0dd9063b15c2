#include "ops/memsave_bitmask.h"

#include <tuple>

#include <torch/library.h>

#include "cpu/memsave_bitmask.h"
#include "ops/common.h"

namespace slimtune {

void check_memsave_relu_mask(const at::Tensor& x) {
  SLIMTUNE_CHECK_ARG(is_float_dtype(x.scalar_type()), "memsave_relu_mask", "x",
                     "must be float32, float16, bfloat16 or float64, got ", x.scalar_type());
}

void check_memsave_relu_backward(const at::Tensor& grad, const at::Tensor& mask) {
  constexpr const char* op = "memsave_relu_backward";
  SLIMTUNE_CHECK_ARG(is_float_dtype(grad.scalar_type()), op, "grad",
                     "must be float32, float16, bfloat16 or float64, got ", grad.scalar_type());
  SLIMTUNE_CHECK_ARG(mask.scalar_type() == at::kByte, op, "mask", "must be uint8 (bit-packed), got ",
                     mask.scalar_type());
  SLIMTUNE_CHECK_ARG(mask.dim() == 1 && mask.numel() == memsave_mask_bytes(grad.numel()), op, "mask",
                     "must be 1-D with ceil(grad.numel() / 8) = ", memsave_mask_bytes(grad.numel()),
                     " bytes, got shape ", mask.sizes());
  SLIMTUNE_CHECK_ARG(mask.is_contiguous(), op, "mask", "must be contiguous");
  check_same_device(op, grad, "grad", mask, "mask");
}

namespace {

at::Tensor memsave_relu_mask_cpu(const at::Tensor& x) {
  check_memsave_relu_mask(x);
  const at::Tensor xc = x.contiguous();
  at::Tensor mask = at::empty({memsave_mask_bytes(x.numel())}, x.options().dtype(at::kByte));
  cpu::memsave_relu_mask(xc, mask);
  return mask;
}

std::tuple<at::Tensor, at::Tensor> memsave_relu_cpu(const at::Tensor& x) {
  check_memsave_relu_mask(x);
  const at::Tensor xc = x.contiguous();
  at::Tensor out = at::empty_like(xc, at::MemoryFormat::Contiguous);
  at::Tensor mask = at::empty({memsave_mask_bytes(x.numel())}, x.options().dtype(at::kByte));
  cpu::memsave_relu_forward(xc, out, mask);
  return {out, mask};
}

at::Tensor memsave_relu_backward_cpu(const at::Tensor& grad, const at::Tensor& mask) {
  check_memsave_relu_backward(grad, mask);
  const at::Tensor gc = grad.contiguous();
  at::Tensor out = at::empty_like(gc, at::MemoryFormat::Contiguous);
  cpu::memsave_relu_backward(gc, mask, out);
  return out;
}

}  // namespace
}  // namespace slimtune

TORCH_LIBRARY_IMPL(slimtune, CPU, m) {
  m.impl("memsave_relu", &slimtune::memsave_relu_cpu);
  m.impl("memsave_relu_mask", &slimtune::memsave_relu_mask_cpu);
  m.impl("memsave_relu_backward", &slimtune::memsave_relu_backward_cpu);
}
