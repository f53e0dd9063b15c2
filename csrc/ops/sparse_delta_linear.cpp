#include "ops/sparse_delta_linear.h"

#include <ATen/Dispatch.h>
#include <torch/library.h>

#include "cpu/sparse_delta_linear.h"
#include "cpu/sparse_delta_merge.h"
#include "ops/common.h"

namespace slimtune {

namespace {

template <typename I>
void scan_cpu(const char* op, const I* idx, const int64_t* rp, int64_t K, int64_t rows, int64_t cols) {
  for (int64_t k = 0; k < K; ++k) {
    const int64_t v = static_cast<int64_t>(idx[k]);
    SLIMTUNE_CHECK_ARG(v >= 0 && v < rows * cols, op, "indices", "holds ", v, " at position ", k,
                       ", out of range for a ", rows, "x", cols, " weight");
    SLIMTUNE_CHECK_ARG(k == 0 || static_cast<int64_t>(idx[k - 1]) < v, op, "indices",
                       "must be sorted and unique; position ", k, " holds ", v, " after ",
                       static_cast<int64_t>(idx[k == 0 ? 0 : k - 1]));
  }
  SLIMTUNE_CHECK_ARG(rp[0] == 0 && rp[rows] == K, op, "rowptr", "must start at 0 and end at ", K,
                     " (the number of indices); got ", rp[0], " and ", rp[rows]);
  for (int64_t r = 0; r < rows; ++r) {
    SLIMTUNE_CHECK_ARG(rp[r] <= rp[r + 1], op, "rowptr", "must be non-decreasing; it drops at row ", r);
    for (int64_t k = rp[r]; k < rp[r + 1]; ++k) {
      const int64_t v = static_cast<int64_t>(idx[k]);
      SLIMTUNE_CHECK_ARG(v >= r * cols && v < (r + 1) * cols, op, "rowptr", "assigns entry ", k, " (index ", v,
                         ") to row ", r, "; it is stale for these 'indices' (recompute it with rowptr_for)");
    }
  }
}

}  // namespace

void check_sparse_delta_layout(const char* op, int64_t rows, int64_t cols, const at::Tensor& ref,
                               const at::Tensor& indices, const at::Tensor& rowptr) {
  SLIMTUNE_CHECK_ARG(indices.scalar_type() == at::kInt || indices.scalar_type() == at::kLong, op, "indices",
                     "must be int32 or int64, got ", indices.scalar_type());
  SLIMTUNE_CHECK_ARG(indices.dim() == 1, op, "indices", "must be 1-D, got shape ", indices.sizes());
  SLIMTUNE_CHECK_ARG(indices.scalar_type() == at::kLong || rows * cols < (int64_t(1) << 31), op, "indices",
                     "must be int64 for a weight of ", rows * cols, " >= 2^31 elements");
  SLIMTUNE_CHECK_ARG(rowptr.scalar_type() == at::kLong, op, "rowptr", "must be int64, got ", rowptr.scalar_type());
  SLIMTUNE_CHECK_ARG(rowptr.dim() == 1 && rowptr.size(0) == rows + 1, op, "rowptr", "must have shape (", rows + 1,
                     ",) for ", rows, " output rows, got ", rowptr.sizes());
  check_same_device(op, ref, "x", indices, "indices");
  check_same_device(op, ref, "x", rowptr, "rowptr");
  if (!indices.is_cpu()) return;
  const at::Tensor idx = indices.contiguous();
  const at::Tensor rp = rowptr.contiguous();
  AT_DISPATCH_INDEX_TYPES(idx.scalar_type(), "sparse_delta_scan", [&] {
    scan_cpu<index_t>(op, idx.data_ptr<index_t>(), rp.data_ptr<int64_t>(), idx.numel(), rows, cols);
  });
}

void check_sparse_delta_linear(const char* op, const at::Tensor& x, const at::Tensor& weight,
                               const c10::optional<at::Tensor>& bias, const at::Tensor& indices,
                               const at::Tensor& rowptr, const at::Tensor& values) {
  SLIMTUNE_CHECK_ARG(is_float_dtype(weight.scalar_type()), op, "weight",
                     "must be float32, float16, bfloat16 or float64, got ", weight.scalar_type());
  SLIMTUNE_CHECK_ARG(weight.dim() == 2, op, "weight", "must be 2-D (out_features, in_features), got shape ",
                     weight.sizes());
  SLIMTUNE_CHECK_ARG(weight.is_contiguous(), op, "weight",
                     "must be contiguous (flat indices address its storage order); got strides ", weight.strides());
  SLIMTUNE_CHECK_ARG(x.scalar_type() == weight.scalar_type(), op, "x", "must have the weight's dtype (",
                     weight.scalar_type(), "), got ", x.scalar_type());
  SLIMTUNE_CHECK_ARG(x.dim() >= 1 && x.size(-1) == weight.size(1), op, "x", "must end in in_features=",
                     weight.size(1), ", got shape ", x.sizes());
  check_same_device(op, x, "x", weight, "weight");
  if (bias.has_value()) {
    SLIMTUNE_CHECK_ARG(bias->dim() == 1 && bias->size(0) == weight.size(0), op, "bias", "must have shape (",
                       weight.size(0), ",), got ", bias->sizes());
    SLIMTUNE_CHECK_ARG(bias->scalar_type() == weight.scalar_type(), op, "bias", "must have the weight's dtype (",
                       weight.scalar_type(), "), got ", bias->scalar_type());
    check_same_device(op, x, "x", *bias, "bias");
  }
  SLIMTUNE_CHECK_ARG(values.scalar_type() == weight.scalar_type() || values.scalar_type() == at::kFloat, op, "values",
                     "must have the weight's dtype (", weight.scalar_type(), ") or float32, got ",
                     values.scalar_type());
  SLIMTUNE_CHECK_ARG(values.dim() == 1 && values.numel() == indices.numel(), op, "values",
                     "must be 1-D with as many elements as 'indices' (", indices.numel(), "), got shape ",
                     values.sizes());
  check_same_device(op, x, "x", values, "values");
  check_sparse_delta_layout(op, weight.size(0), weight.size(1), x, indices, rowptr);
}

void check_sparse_delta_backward(const char* op, const at::Tensor& grad, const at::Tensor& x,
                                 const at::Tensor& weight, const at::Tensor& indices, const at::Tensor& rowptr,
                                 const at::Tensor& values) {
  check_sparse_delta_linear(op, x, weight, c10::nullopt, indices, rowptr, values);
  SLIMTUNE_CHECK_ARG(grad.scalar_type() == x.scalar_type(), op, "grad", "must have x's dtype (", x.scalar_type(),
                     "), got ", grad.scalar_type());
  SLIMTUNE_CHECK_ARG(grad.dim() == x.dim() && grad.size(-1) == weight.size(0) &&
                         grad.numel() / std::max<int64_t>(weight.size(0), 1) ==
                             x.numel() / std::max<int64_t>(weight.size(1), 1),
                     op, "grad", "must have shape x.shape[:-1] + (", weight.size(0), ",), got ", grad.sizes());
  check_same_device(op, x, "x", grad, "grad");
}

void check_sparse_delta_sddmm(const char* op, const at::Tensor& a, const at::Tensor& b, const at::Tensor& indices,
                              const at::Tensor& rowptr) {
  SLIMTUNE_CHECK_ARG(is_float_dtype(a.scalar_type()), op, "a", "must be a float tensor, got ", a.scalar_type());
  SLIMTUNE_CHECK_ARG(b.scalar_type() == a.scalar_type(), op, "b", "must have a's dtype (", a.scalar_type(),
                     "), got ", b.scalar_type());
  SLIMTUNE_CHECK_ARG(a.dim() >= 1 && b.dim() == a.dim() && a.numel() / std::max<int64_t>(a.size(-1), 1) ==
                                                               b.numel() / std::max<int64_t>(b.size(-1), 1),
                     op, "b", "must have a's leading (token) dimensions; got ", a.sizes(), " and ", b.sizes());
  check_same_device(op, a, "a", b, "b");
  check_sparse_delta_layout(op, a.size(-1), b.size(-1), a, indices, rowptr);
}

namespace {

// W0 + Δ as a new tensor (the caller drops it before returning).
at::Tensor merged_cpu(const at::Tensor& weight, const at::Tensor& indices, const at::Tensor& values) {
  at::Tensor w = weight.clone();
  cpu::sparse_delta_merge(w, indices, values, 1.0);
  return w;
}

at::Tensor sparse_delta_linear_cpu(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                                   const at::Tensor& indices, const at::Tensor& rowptr, const at::Tensor& values) {
  check_sparse_delta_linear("sparse_delta_linear", x, weight, bias, indices, rowptr, values);
  const at::Tensor x2 = as_tokens(x);
  const at::Tensor idx = indices.contiguous(), rp = rowptr.contiguous(), val = values.contiguous();
  const int64_t rows = weight.size(0), cols = weight.size(1);
  at::Tensor y;
  if (sparse_delta_use_merge(x2.size(0), idx.numel(), weight.numel())) {
    const at::Tensor w = merged_cpu(weight, idx, val);
    y = bias.has_value() ? at::addmm(*bias, x2, w.t()) : at::mm(x2, w.t());
  } else {
    y = bias.has_value() ? at::addmm(*bias, x2, weight.t()) : at::mm(x2, weight.t());
    cpu::sparse_delta_spmm(y, x2, idx, rp, val, cols);
  }
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = rows;
  return y.view(shape);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> sparse_delta_linear_backward_cpu(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& indices,
    const at::Tensor& rowptr, const at::Tensor& values, std::array<bool, 3> mask) {
  constexpr const char* op = "sparse_delta_linear_backward";
  check_sparse_delta_backward(op, grad, x, weight, indices, rowptr, values);
  const at::Tensor g2 = as_tokens(grad), x2 = as_tokens(x);
  const at::Tensor idx = indices.contiguous(), rp = rowptr.contiguous(), val = values.contiguous();
  const int64_t cols = weight.size(1);
  at::Tensor dx, dv, db;
  if (mask[0]) {
    if (sparse_delta_use_merge(g2.size(0), idx.numel(), weight.numel())) {
      dx = at::mm(g2, merged_cpu(weight, idx, val));
    } else {
      dx = at::mm(g2, weight);
      cpu::sparse_delta_spmm_t(dx, g2, idx, rp, val, cols);
    }
    dx = dx.view(x.sizes());
  } else {
    dx = at::empty({0}, x.options());
  }
  dv = mask[1] ? cpu::sparse_delta_sddmm(g2, x2, idx, rp, cols).to(values.scalar_type())
               : at::empty({0}, values.options());
  db = mask[2] ? g2.sum(0, false, g2.scalar_type() == at::kDouble ? at::kDouble : at::kFloat).to(g2.scalar_type())
               : at::empty({0}, grad.options());
  return {dx, dv, db};
}

at::Tensor sparse_delta_sddmm_cpu(const at::Tensor& a, const at::Tensor& b, const at::Tensor& indices,
                                  const at::Tensor& rowptr) {
  constexpr const char* op = "sparse_delta_sddmm";
  check_sparse_delta_sddmm(op, a, b, indices, rowptr);
  return cpu::sparse_delta_sddmm(as_tokens(a), as_tokens(b), indices.contiguous(), rowptr.contiguous(), b.size(-1));
}

}  // namespace
}  // namespace slimtune

TORCH_LIBRARY_IMPL(slimtune, CPU, m) {
  m.impl("sparse_delta_linear", &slimtune::sparse_delta_linear_cpu);
  m.impl("sparse_delta_linear_backward", &slimtune::sparse_delta_linear_backward_cpu);
  m.impl("sparse_delta_sddmm", &slimtune::sparse_delta_sddmm_cpu);
}
