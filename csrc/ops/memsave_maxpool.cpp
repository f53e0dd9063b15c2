#include "ops/memsave_maxpool.h"

#include <torch/library.h>

#include "cpu/memsave_maxpool.h"
#include "ops/common.h"

namespace slimtune {
namespace {

// The kernel geometry from the pool's arguments; `pooled` (the indices or the grad) is shaped
// like the pool's output.
cuda::PoolGeometry memsave_pool_geometry(const char* op, const at::Tensor& pooled, const char* pooled_name,
                                         at::IntArrayRef input_size, at::IntArrayRef kernel_size,
                                         at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation) {
  const int64_t nd = static_cast<int64_t>(kernel_size.size());
  SLIMTUNE_CHECK_ARG(nd >= 1 && nd <= 3, op, "kernel_size", "must have 1 to 3 entries, got ", kernel_size);
  SLIMTUNE_CHECK_ARG(static_cast<int64_t>(stride.size()) == nd, op, "stride", "must have ", nd, " entries");
  SLIMTUNE_CHECK_ARG(static_cast<int64_t>(padding.size()) == nd, op, "padding", "must have ", nd, " entries");
  SLIMTUNE_CHECK_ARG(static_cast<int64_t>(dilation.size()) == nd, op, "dilation", "must have ", nd, " entries");
  const int64_t dims = static_cast<int64_t>(input_size.size());
  SLIMTUNE_CHECK_ARG(dims > nd, op, "input_size", "must have more than ", nd, " dims, got ", input_size);
  SLIMTUNE_CHECK_ARG(pooled.dim() == dims, op, pooled_name, "must have ", dims, " dims like the input, got shape ",
                     pooled.sizes());
  cuda::PoolGeometry g{};
  g.planes = 1;
  for (int64_t i = 0; i < dims - nd; ++i) {
    SLIMTUNE_CHECK_ARG(pooled.size(i) == input_size[i], op, pooled_name, "has shape ", pooled.sizes(),
                       " but the input's leading dims are ", input_size.slice(0, dims - nd));
    g.planes *= input_size[i];
  }
  int64_t window = 1;
  for (int64_t d = 0; d < 3; ++d) {
    const int64_t j = d - (3 - nd);  // index into the per-dim lists, negative for unused dims
    const bool used = j >= 0;
    g.in[d] = used ? input_size[dims - nd + j] : 1;
    g.out[d] = used ? pooled.size(dims - nd + j) : 1;
    g.kernel[d] = used ? kernel_size[j] : 1;
    g.stride[d] = used ? stride[j] : 1;
    g.padding[d] = used ? padding[j] : 0;
    g.dilation[d] = used ? dilation[j] : 1;
    SLIMTUNE_CHECK_ARG(g.kernel[d] >= 1 && g.stride[d] >= 1 && g.dilation[d] >= 1 && g.padding[d] >= 0, op,
                       "kernel_size", "stride/dilation must be positive and padding non-negative");
    window *= g.kernel[d];
  }
  SLIMTUNE_CHECK_ARG(window <= 127, op, "kernel_size", "window of ", window,
                     " elements does not fit int8 offsets (at most 127)");
  return g;
}

}  // namespace

cuda::PoolGeometry check_maxpool_compact(const at::Tensor& indices, at::IntArrayRef input_size,
                                         at::IntArrayRef kernel_size, at::IntArrayRef stride, at::IntArrayRef padding,
                                         at::IntArrayRef dilation) {
  constexpr const char* op = "memsave_maxpool_compact";
  SLIMTUNE_CHECK_ARG(indices.scalar_type() == at::kLong, op, "indices", "must be int64, got ", indices.scalar_type());
  return memsave_pool_geometry(op, indices, "indices", input_size, kernel_size, stride, padding, dilation);
}

cuda::PoolGeometry check_maxpool_backward(const at::Tensor& grad, const at::Tensor& offsets, at::IntArrayRef input_size,
                                          at::IntArrayRef kernel_size, at::IntArrayRef stride, at::IntArrayRef padding,
                                          at::IntArrayRef dilation) {
  constexpr const char* op = "memsave_maxpool_backward";
  SLIMTUNE_CHECK_ARG(is_float_dtype(grad.scalar_type()), op, "grad", "must be a float tensor, got ",
                     grad.scalar_type());
  SLIMTUNE_CHECK_ARG(offsets.scalar_type() == at::kChar, op, "offsets", "must be int8, got ", offsets.scalar_type());
  SLIMTUNE_CHECK_ARG(offsets.sizes() == grad.sizes(), op, "offsets", "has shape ", offsets.sizes(),
                     " but 'grad' has ", grad.sizes());
  check_same_device(op, grad, "grad", offsets, "offsets");
  return memsave_pool_geometry(op, grad, "grad", input_size, kernel_size, stride, padding, dilation);
}

namespace {

at::Tensor memsave_maxpool_compact_cpu(const at::Tensor& indices, at::IntArrayRef input_size,
                                       at::IntArrayRef kernel_size, at::IntArrayRef stride, at::IntArrayRef padding,
                                       at::IntArrayRef dilation) {
  const auto g = check_maxpool_compact(indices, input_size, kernel_size, stride, padding, dilation);
  const at::Tensor idx = indices.contiguous();
  at::Tensor offsets = at::empty(idx.sizes(), idx.options().dtype(at::kChar));
  cpu::memsave_maxpool_compact(idx, offsets, g);
  return offsets;
}

at::Tensor memsave_maxpool_backward_cpu(const at::Tensor& grad, const at::Tensor& offsets, at::IntArrayRef input_size,
                                        at::IntArrayRef kernel_size, at::IntArrayRef stride, at::IntArrayRef padding,
                                        at::IntArrayRef dilation) {
  const auto g = check_maxpool_backward(grad, offsets, input_size, kernel_size, stride, padding, dilation);
  const auto acc = grad.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor buf = at::zeros(input_size, grad.options().dtype(acc));
  cpu::memsave_maxpool_backward(grad.contiguous(), offsets.contiguous(), buf, g);
  return buf.to(grad.scalar_type());
}

}  // namespace
}  // namespace slimtune

TORCH_LIBRARY_IMPL(slimtune, CPU, m) {
  m.impl("memsave_maxpool_compact", &slimtune::memsave_maxpool_compact_cpu);
  m.impl("memsave_maxpool_backward", &slimtune::memsave_maxpool_backward_cpu);
}
