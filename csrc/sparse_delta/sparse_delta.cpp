// Glue of the sparse-delta family: argument checks, the one device-generic driver of each op,
// the schemas and the registration for every backend. Kernels: sparse_delta_cpu.cpp, sparse_delta.cu.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/core/DeviceGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <optional>
#include <tuple>
#include <vector>

#include "common/backend.h"
#include "common/checks.h"
#include "common/register.h"
#include "common/schemas.h"
#include "sparse_delta/sparse_delta.h"

namespace slimtune {
namespace sparse_delta {
namespace {

// ---- argument checks (one place for every backend) ----

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
  // The whole of rowptr before any row is walked: then every entry lies in [0, K].
  for (int64_t r = 0; r < rows; ++r) {
    SLIMTUNE_CHECK_ARG(rp[r] <= rp[r + 1], op, "rowptr", "must be non-decreasing; it drops at row ", r, " (",
                       rp[r], " then ", rp[r + 1], ")");
  }
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t k = rp[r]; k < rp[r + 1]; ++k) {
      const int64_t v = static_cast<int64_t>(idx[k]);
      SLIMTUNE_CHECK_ARG(v >= r * cols && v < (r + 1) * cols, op, "rowptr", "assigns entry ", k, " (index ", v,
                         ") to row ", r, "; it is stale for these 'indices' (recompute it with rowptr_for)");
    }
  }
}

// Metadata (dtypes, shapes, devices); the O(K) scan of the values is validate_layout's.
void check_layout(const char* op, int64_t rows, int64_t cols, const at::Tensor& ref, const at::Tensor& indices,
                  const at::Tensor& rowptr) {
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
}

void scan_host(const char* op, const at::Tensor& idx, const at::Tensor& rp, int64_t rows, int64_t cols) {
  AT_DISPATCH_INDEX_TYPES(idx.scalar_type(), "sparse_delta_scan", [&] {
    scan_cpu<index_t>(op, idx.data_ptr<index_t>(), rp.data_ptr<int64_t>(), idx.numel(), rows, cols);
  });
}

void check_linear(const char* op, const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                  const at::Tensor& indices, const at::Tensor& rowptr, const at::Tensor& values) {
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
  check_layout(op, weight.size(0), weight.size(1), x, indices, rowptr);
}

// sparse_delta_linear_backward: the forward's checks plus grad's dtype, shape and device.
void check_backward(const char* op, const at::Tensor& grad, const at::Tensor& x, const at::Tensor& weight,
                    const at::Tensor& indices, const at::Tensor& rowptr, const at::Tensor& values) {
  check_linear(op, x, weight, std::nullopt, indices, rowptr, values);
  SLIMTUNE_CHECK_ARG(grad.scalar_type() == x.scalar_type(), op, "grad", "must have x's dtype (", x.scalar_type(),
                     "), got ", grad.scalar_type());
  SLIMTUNE_CHECK_ARG(grad.dim() == x.dim() && grad.size(-1) == weight.size(0) && same_tokens(grad, x),
                     op, "grad", "must have shape x.shape[:-1] + (", weight.size(0), ",), got ", grad.sizes());
  check_same_device(op, x, "x", grad, "grad");
}

// sparse_delta_sddmm: float a, b of one dtype and device with the same tokens, and the layout.
void check_sddmm(const char* op, const at::Tensor& a, const at::Tensor& b, const at::Tensor& indices,
                 const at::Tensor& rowptr) {
  SLIMTUNE_CHECK_ARG(is_float_dtype(a.scalar_type()), op, "a", "must be a float tensor, got ", a.scalar_type());
  SLIMTUNE_CHECK_ARG(b.scalar_type() == a.scalar_type(), op, "b", "must have a's dtype (", a.scalar_type(),
                     "), got ", b.scalar_type());
  SLIMTUNE_CHECK_ARG(a.dim() >= 1 && same_tokens(a, b),
                     op, "b", "must have a's leading (token) dimensions; got ", a.sizes(), " and ", b.sizes());
  check_same_device(op, a, "a", b, "b");
  check_layout(op, a.size(-1), b.size(-1), a, indices, rowptr);
}

void check_merge(const at::Tensor& weight, const at::Tensor& indices, const at::Tensor& values, double alpha) {
  constexpr const char* op = "sparse_delta_merge_";
  const auto wt = weight.scalar_type();
  SLIMTUNE_CHECK_ARG(is_float_dtype(wt), op, "weight", "must be float32, float16, bfloat16 or float64, got ", wt);
  SLIMTUNE_CHECK_ARG(weight.is_contiguous(), op, "weight",
                     "must be contiguous (flat indices address its storage order); got strides ", weight.strides());
  SLIMTUNE_CHECK_ARG(values.scalar_type() == wt || values.scalar_type() == at::kFloat, op, "values",
                     "must have the weight's dtype (", wt, ") or float32, got ", values.scalar_type());
  SLIMTUNE_CHECK_ARG(values.dim() == 1, op, "values", "must be 1-D, got shape ", values.sizes());
  SLIMTUNE_CHECK_ARG(values.numel() == indices.numel(), op, "values", "has ", values.numel(),
                     " elements but 'indices' has ", indices.numel());
  check_same_device(op, weight, "weight", indices, "indices");
  check_same_device(op, weight, "weight", values, "values");
  SLIMTUNE_CHECK_ARG(std::isfinite(alpha), op, "alpha", "must be finite, got ", alpha);
  check_flat_indices(op, indices, "indices", weight.numel());
  SLIMTUNE_CHECK_ARG(all_finite(values), op, "values", "holds NaN or infinite entries");
}

// ---- the kernels of one backend ----

struct Kernels {
  const Backend& backend;
  KernelEntry<MergeParams> merge;
  KernelEntry<SpmmParams> spmm;
  KernelEntry<SpmmTParams> spmm_t;
  KernelEntry<SddmmParams> sddmm;
  // Token slices of the SDDMM (each a chunks × K workspace row); 0: no workspace.
  int64_t (*sddmm_chunks)(int64_t T, int64_t K);
  // int32 workspace slots of spmm_t (SpmmTParams::starts); 0: none.
  int64_t (*spmm_t_starts)(int64_t rows, int64_t cols);
  // Device-side layout check; null where the indices are scanned on the host.
  KernelEntry<ValidateParams> validate;
};

// Sorted, unique, in-range indices and a rowptr consistent with them, before any kernel reads
// them: wrong ones would make the row kernels read and write out of bounds. The CPU scans on the
// host; a device backend runs validate_cuda and reads back one flag (the only host sync of these
// ops), and on failure scans a host copy so the error names the fault like the CPU does.
void validate_layout(const Kernels& k, const char* op, int64_t rows, int64_t cols, const at::Tensor& idx,
                     const at::Tensor& rp) {
  if (k.validate == nullptr) return scan_host(op, idx, rp, rows, cols);
  const int64_t ok = idx.numel() + rows + 1;
  at::Tensor first_bad = at::full({1}, ok, rp.options());
  const ValidateParams p{idx.data_ptr(), to_kernel_index(idx.scalar_type()), rp.data_ptr<int64_t>(), idx.numel(),
                         rows, cols, first_bad.data_ptr<int64_t>()};
  check_status(k.backend, k.validate(p, k.backend.stream(rp)), op);
  if (first_bad.item<int64_t>() == ok) return;
  scan_host(op, idx.cpu(), rp.cpu(), rows, cols);
  TORCH_CHECK(false, "slimtune.", op, ": argument 'indices' or 'rowptr' is inconsistent");
}

int64_t no_workspace(int64_t, int64_t) { return 0; }

// Enough token slices to fill the GPU when K is small, few enough to keep the workspace small.
int64_t gpu_chunks(int64_t T, int64_t K) {
  return std::max<int64_t>(1, std::min<int64_t>({(T + 255) / 256, 64, (1 << 22) / std::max<int64_t>(K, 1) + 1}));
}

// 2-D views: x as (T, d_in) contiguous, grad as (T, d_out) contiguous.
at::Tensor as_tokens(const at::Tensor& t) { return as_token_rows(t).contiguous(); }

// The CSR delta (idx, rp, val) of a rows×cols weight times the tokens of `tokens` (T×d).
SpmmOperands spmm_operands(const at::Tensor& tokens, const at::Tensor& idx, const at::Tensor& rp, const at::Tensor& val,
                           int64_t rows, int64_t cols) {
  return {to_kernel_dtype(tokens.scalar_type()), idx.data_ptr(), to_kernel_index(idx.scalar_type()),
          rp.data_ptr<int64_t>(), val.data_ptr(), to_kernel_dtype(val.scalar_type()), tokens.size(0), rows, cols};
}

void run_merge(const Kernels& k, at::Tensor& weight, const at::Tensor& idx, const at::Tensor& val, double alpha,
               const char* op) {
  const MergeParams p{weight.data_ptr(), to_kernel_dtype(weight.scalar_type()), idx.data_ptr(),
                      to_kernel_index(idx.scalar_type()), val.data_ptr(), to_kernel_dtype(val.scalar_type()),
                      idx.numel(), alpha};
  check_status(k.backend, k.merge(p, k.backend.stream(weight)), op);
}

at::Tensor sddmm_impl(const Kernels& k, const at::Tensor& a2, const at::Tensor& b2, const at::Tensor& idx,
                      const at::Tensor& rp, const char* op) {
  const int64_t T = a2.size(0), K = idx.numel();
  at::Tensor out = at::empty({K}, a2.options().dtype(acc_scalar_type(a2.scalar_type())));
  if (K == 0) return out;
  if (T == 0) return out.zero_();
  const int64_t chunks = k.sddmm_chunks(T, K);
  at::Tensor ws = chunks > 0 ? at::empty({chunks, K}, out.options()) : at::Tensor();
  const SddmmParams p{a2.data_ptr(), b2.data_ptr(), to_kernel_dtype(a2.scalar_type()), idx.data_ptr(),
                      to_kernel_index(idx.scalar_type()), rp.data_ptr<int64_t>(), K, T, a2.size(1), b2.size(1),
                      chunks > 0 ? ws.data_ptr() : nullptr, chunks, out.data_ptr()};
  check_status(k.backend, k.sddmm(p, k.backend.stream(a2)), op);
  return out;
}

// ---- the drivers (one per op, every backend) ----

void merge_op(const Kernels& k, at::Tensor weight, const at::Tensor& indices, const at::Tensor& values, double alpha) {
  check_merge(weight, indices, values, alpha);
  check_backend(k.backend, "sparse_delta_merge_", weight, "weight");
  c10::DeviceGuard guard(weight.device());
  run_merge(k, weight, indices.contiguous(), values.contiguous(), alpha, "sparse_delta_merge_");
}

at::Tensor linear_op(const Kernels& k, const at::Tensor& x, const at::Tensor& weight,
                     const std::optional<at::Tensor>& bias, const at::Tensor& indices, const at::Tensor& rowptr,
                     const at::Tensor& values) {
  constexpr const char* op = "sparse_delta_linear";
  check_linear(op, x, weight, bias, indices, rowptr, values);
  check_backend(k.backend, op, x, "x");
  c10::DeviceGuard guard(x.device());
  const at::Tensor x2 = as_tokens(x);
  const at::Tensor idx = indices.contiguous(), rp = rowptr.contiguous(), val = values.contiguous();
  const int64_t rows = weight.size(0), cols = weight.size(1);
  validate_layout(k, op, rows, cols, idx, rp);
  // bf16/fp16: the delta term x·Δᵀ + bias rounded once into the output, then x·W0ᵀ added into it by
  // a GEMM with beta 1 in the operands' dtype (cuBLAS and ATen's CPU GEMM add C in float32 and round
  // once): no T×rows float32 intermediate, and float32 master values are never rounded to a
  // low-precision weight. float32/float64: x·W0ᵀ + bias first, then the SpMM adds the delta's sum
  // into it once. A BLAS may add C into a partial product (MKL's sgemm below 4 rows), which would make
  // a token's bits depend on its batch; here the product is no wider than the output, so writing it
  // first moves the same bytes as beta 1 would.
  const int64_t T = x2.size(0);
  const bool lowp = acc_scalar_type(x2.scalar_type()) != x2.scalar_type();
  const at::Tensor b = lowp && bias.has_value() ? bias->contiguous() : at::Tensor();
  at::Tensor out = lowp               ? at::empty({T, rows}, x2.options())
                   : bias.has_value() ? at::addmm(*bias, x2, weight.t())
                                      : at::mm(x2, weight.t());
  if (T > 0) {
    const SpmmParams p{{spmm_operands(x2, idx, rp, val, rows, cols)}, b.defined() ? b.data_ptr() : nullptr,
                       x2.data_ptr(), out.data_ptr(), !lowp};
    check_status(k.backend, k.spmm(p, k.backend.stream(x)), op);
  }
  if (lowp) out.addmm_(x2, weight.t());
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = rows;
  return out.view(shape);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_backward_op(const Kernels& k, const at::Tensor& grad,
                                                                  const at::Tensor& x, const at::Tensor& weight,
                                                                  const at::Tensor& indices, const at::Tensor& rowptr,
                                                                  const at::Tensor& values, std::array<bool, 3> mask) {
  constexpr const char* op = "sparse_delta_linear_backward";
  check_backward(op, grad, x, weight, indices, rowptr, values);
  check_backend(k.backend, op, x, "x");
  c10::DeviceGuard guard(x.device());
  const at::Tensor g2 = as_tokens(grad), x2 = as_tokens(x);
  const at::Tensor idx = indices.contiguous(), rp = rowptr.contiguous(), val = values.contiguous();
  validate_layout(k, op, weight.size(0), weight.size(1), idx, rp);
  at::Tensor dx, dv, db;
  if (mask[0]) {
    // g·W0 and g·Δ, added as in the forward.
    const int64_t rows = weight.size(0), cols = weight.size(1);
    const bool lowp = acc_scalar_type(g2.scalar_type()) != g2.scalar_type();
    dx = lowp ? at::empty({g2.size(0), cols}, g2.options()) : at::mm(g2, weight);
    if (g2.size(0) > 0) {
      const int64_t slots = k.spmm_t_starts(rows, cols);
      at::Tensor starts = slots > 0 ? at::empty({slots}, idx.options().dtype(at::kInt)) : at::Tensor();
      const SpmmTParams p{{spmm_operands(g2, idx, rp, val, rows, cols)},
                          g2.data_ptr(),
                          dx.data_ptr(),
                          !lowp,
                          slots > 0 ? starts.data_ptr<int32_t>() : nullptr};
      check_status(k.backend, k.spmm_t(p, k.backend.stream(x)), op);
    }
    if (lowp) dx.addmm_(g2, weight);
    dx = dx.view(x.sizes());
  } else {
    dx = at::empty({0}, x.options());
  }
  dv = mask[1] ? sddmm_impl(k, g2, x2, idx, rp, op).to(values.scalar_type()) : at::empty({0}, values.options());
  db = mask[2] ? g2.sum(0, false, acc_scalar_type(g2.scalar_type())).to(g2.scalar_type())
               : at::empty({0}, grad.options());
  return {dx, dv, db};
}

at::Tensor sddmm_op(const Kernels& k, const at::Tensor& a, const at::Tensor& b, const at::Tensor& indices,
                    const at::Tensor& rowptr) {
  constexpr const char* op = "sparse_delta_sddmm";
  check_sddmm(op, a, b, indices, rowptr);
  check_backend(k.backend, op, a, "a");
  c10::DeviceGuard guard(a.device());
  const at::Tensor idx = indices.contiguous(), rp = rowptr.contiguous();
  validate_layout(k, op, a.size(-1), b.size(-1), idx, rp);
  return sddmm_impl(k, as_tokens(a), as_tokens(b), idx, rp, op);
}

// ---- registration ----

// Binds the drivers to one backend's kernels: the dispatcher needs plain functions.
// The family's ops, each registered by every backend through Bound.
constexpr std::array<const char*, 4> kOps{"sparse_delta_merge_", "sparse_delta_linear", "sparse_delta_linear_backward",
                                          "sparse_delta_sddmm"};

template <const Kernels& K>
struct Bound {
  static void merge(at::Tensor weight, const at::Tensor& indices, const at::Tensor& values, double alpha) {
    merge_op(K, weight, indices, values, alpha);
  }
  static at::Tensor linear(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                           const at::Tensor& indices, const at::Tensor& rowptr, const at::Tensor& values) {
    return linear_op(K, x, weight, bias, indices, rowptr, values);
  }
  static std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_backward(const at::Tensor& grad, const at::Tensor& x,
                                                                        const at::Tensor& weight,
                                                                        const at::Tensor& indices,
                                                                        const at::Tensor& rowptr,
                                                                        const at::Tensor& values,
                                                                        std::array<bool, 3> mask) {
    return linear_backward_op(K, grad, x, weight, indices, rowptr, values, mask);
  }
  static at::Tensor sddmm(const at::Tensor& a, const at::Tensor& b, const at::Tensor& indices,
                          const at::Tensor& rowptr) {
    return sddmm_op(K, a, b, indices, rowptr);
  }
  static void register_all(torch::Library& m) { impl_ops(m, kOps, &merge, &linear, &linear_backward, &sddmm); }
};

#ifndef SLIMTUNE_HOST_EMULATION
const Kernels kCpuKernels{kCpuBackend, &merge_cpu,    &spmm_cpu,     &spmm_t_cpu, &sddmm_cpu,
                          &no_workspace, &no_workspace, nullptr};
#endif
#ifdef SLIMTUNE_HAS_GPU
const Kernels kGpuKernels{kGpuBackend, &merge_cuda,         &spmm_cuda,    &spmm_t_cuda, &sddmm_cuda,
                          &gpu_chunks,  &spmm_t_starts_cuda, &validate_cuda};
#endif

}  // namespace
}  // namespace sparse_delta

void define_sparse_delta_schemas(torch::Library& m) {
  // weight.view(-1)[indices] += alpha * values, in place.
  m.def("sparse_delta_merge_(Tensor(a!) weight, Tensor indices, Tensor values, float alpha) -> ()");
  // Sparse-delta fine-tuning: y = x·(W0 + Δ)ᵀ (+ bias), Δ = scatter(indices, values) over W0's
  // shape; indices sorted flat positions, rowptr[r] the first entry of row r (int64, rows + 1).
  m.def("sparse_delta_linear(Tensor x, Tensor weight, Tensor? bias, Tensor indices, Tensor rowptr, Tensor values) "
        "-> Tensor");
  m.def("sparse_delta_linear_backward(Tensor grad, Tensor x, Tensor weight, Tensor indices, Tensor rowptr, "
        "Tensor values, bool[3] output_mask) -> (Tensor, Tensor, Tensor)");
  // out[k] = sum_t a[t, row_k] * b[t, col_k] in float32 (float64 for float64): the values' gradient.
  m.def("sparse_delta_sddmm(Tensor a, Tensor b, Tensor indices, Tensor rowptr) -> Tensor");
}

}  // namespace slimtune

SLIMTUNE_REGISTER_FAMILY(slimtune::define_sparse_delta_schemas, slimtune::sparse_delta)
