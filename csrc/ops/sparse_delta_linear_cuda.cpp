#include <c10/core/DeviceGuard.h>
#include <torch/library.h>

#include <algorithm>

#include "cuda/sparse_delta_linear.h"
#include "cuda/sparse_delta_merge.h"
#include "ops/common.h"
#include "ops/cuda_stream.h"
#include "ops/sparse_delta_linear.h"

namespace slimtune {
namespace {

at::Tensor merged_cuda(const at::Tensor& weight, const at::Tensor& idx, const at::Tensor& val, const char* op) {
  at::Tensor w = weight.clone();
  check_cuda_status(cuda::sparse_delta_merge(w.data_ptr(), to_kernel_dtype(w.scalar_type()), idx.data_ptr(),
                                             to_kernel_index(idx.scalar_type()), val.data_ptr(),
                                             to_kernel_dtype(val.scalar_type()), idx.numel(), 1.0,
                                             current_cuda_stream(w.device())),
                    op);
  return w;
}

at::Tensor sddmm_cuda_impl(const at::Tensor& a2, const at::Tensor& b2, const at::Tensor& idx, const char* op) {
  const int64_t T = a2.size(0), K = idx.numel();
  const auto acc = a2.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor out = at::empty({K}, a2.options().dtype(acc));
  if (K == 0) return out;
  if (T == 0) return out.zero_();
  // Enough token slices to fill the GPU when K is small, few enough to keep the workspace small.
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>({(T + 255) / 256, 64, (1 << 22) / std::max<int64_t>(K, 1) + 1}));
  at::Tensor ws = at::empty({chunks, K}, out.options());
  check_cuda_status(cuda::sparse_delta_sddmm(a2.data_ptr(), b2.data_ptr(), to_kernel_dtype(a2.scalar_type()),
                                             idx.data_ptr(), to_kernel_index(idx.scalar_type()), K, T, a2.size(1),
                                             b2.size(1), ws.data_ptr(), chunks, out.data_ptr(),
                                             current_cuda_stream(a2.device())),
                    op);
  return out;
}

at::Tensor sparse_delta_linear_cuda(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                                    const at::Tensor& indices, const at::Tensor& rowptr, const at::Tensor& values) {
  constexpr const char* op = "sparse_delta_linear";
  check_sparse_delta_linear(op, x, weight, bias, indices, rowptr, values);
  c10::DeviceGuard guard(x.device());
  const at::Tensor x2 = as_tokens(x);
  const at::Tensor idx = indices.contiguous(), rp = rowptr.contiguous(), val = values.contiguous();
  const int64_t rows = weight.size(0), cols = weight.size(1);
  at::Tensor y;
  if (sparse_delta_use_merge(x2.size(0), idx.numel(), weight.numel())) {
    const at::Tensor w = merged_cuda(weight, idx, val, op);
    y = bias.has_value() ? at::addmm(*bias, x2, w.t()) : at::mm(x2, w.t());
  } else {
    y = bias.has_value() ? at::addmm(*bias, x2, weight.t()) : at::mm(x2, weight.t());
    check_cuda_status(cuda::sparse_delta_spmm(y.data_ptr(), x2.data_ptr(), to_kernel_dtype(x2.scalar_type()),
                                              idx.data_ptr(), to_kernel_index(idx.scalar_type()),
                                              rp.data_ptr<int64_t>(), val.data_ptr(),
                                              to_kernel_dtype(val.scalar_type()), x2.size(0), rows, cols,
                                              current_cuda_stream(x.device())),
                      op);
  }
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = rows;
  return y.view(shape);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> sparse_delta_linear_backward_cuda(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& indices,
    const at::Tensor& rowptr, const at::Tensor& values, std::array<bool, 3> mask) {
  constexpr const char* op = "sparse_delta_linear_backward";
  check_sparse_delta_backward(op, grad, x, weight, indices, rowptr, values);
  c10::DeviceGuard guard(x.device());
  const at::Tensor g2 = as_tokens(grad), x2 = as_tokens(x);
  const at::Tensor idx = indices.contiguous(), val = values.contiguous();
  // dx through a transient merged weight: a scatter SpMMᵀ would need atomics (columns collide
  // across rows), and one weight copy is cheap next to the GEMM.
  at::Tensor dx = mask[0] ? at::mm(g2, merged_cuda(weight, idx, val, op)).view(x.sizes()) : at::empty({0}, x.options());
  at::Tensor dv = mask[1] ? sddmm_cuda_impl(g2, x2, idx, op).to(values.scalar_type()) : at::empty({0}, values.options());
  at::Tensor db = mask[2] ? g2.sum(0, false, g2.scalar_type() == at::kDouble ? at::kDouble : at::kFloat).to(g2.scalar_type())
                          : at::empty({0}, grad.options());
  return {dx, dv, db};
}

at::Tensor sparse_delta_sddmm_cuda(const at::Tensor& a, const at::Tensor& b, const at::Tensor& indices,
                                   const at::Tensor& rowptr) {
  constexpr const char* op = "sparse_delta_sddmm";
  check_sparse_delta_sddmm(op, a, b, indices, rowptr);
  c10::DeviceGuard guard(a.device());
  return sddmm_cuda_impl(as_tokens(a), as_tokens(b), indices.contiguous(), op);
}

}  // namespace
}  // namespace slimtune

TORCH_LIBRARY_IMPL(slimtune, CUDA, m) {
  m.impl("sparse_delta_linear", &slimtune::sparse_delta_linear_cuda);
  m.impl("sparse_delta_linear_backward", &slimtune::sparse_delta_linear_backward_cuda);
  m.impl("sparse_delta_sddmm", &slimtune::sparse_delta_sddmm_cuda);
}
