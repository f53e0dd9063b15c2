// Glue of the LoRA family: y = x W0^T (+ b) + s (dropout(x) A^T) B^T. The GEMMs with W0 (and
// the up-projection, accumulated into the base output) are ATen's; the passes over x and
// grad_out are the kernels of lora.h (lora_cpu.cpp, lora.cu), which regenerate the Philox mask
// from (seed, offset), so neither a dropped copy of x nor a mask nor any buffer of x's size is
// ever stored. Holds the argument checks, the one device-generic driver of each op, the schemas
// and the registration for every backend.
#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <optional>
#include <tuple>
#include <vector>

#include "common/backend.h"
#include "common/checks.h"
#include "common/philox.h"
#include "common/register.h"
#include "common/schemas.h"
#include "lora/lora.h"

namespace slimtune {
namespace lora {
namespace {

// ---- argument checks (one place for every backend) ----

void check_lora(const char* op, const at::Tensor& x, const std::optional<at::Tensor>& weight,
                const std::optional<at::Tensor>& bias, const at::Tensor& lora_A, const at::Tensor& lora_B, double scale,
                double p) {
  const auto xt = x.scalar_type();
  SLIMTUNE_CHECK_ARG(is_float_dtype(xt), op, "x", "must be float32, float16, bfloat16 or float64, got ", xt);
  SLIMTUNE_CHECK_ARG(x.dim() >= 1, op, "x", "must have at least one dimension");
  SLIMTUNE_CHECK_ARG(lora_A.dim() == 2, op, "lora_A", "must be 2-D (r, in_features), got shape ", lora_A.sizes());
  SLIMTUNE_CHECK_ARG(lora_B.dim() == 2, op, "lora_B", "must be 2-D (out_features, r), got shape ", lora_B.sizes());
  const int64_t r = lora_A.size(0), d_in = lora_A.size(1), d_out = lora_B.size(0);
  SLIMTUNE_CHECK_ARG(lora_B.size(1) == r, op, "lora_B", "has rank ", lora_B.size(1), " but 'lora_A' has rank ", r);
  SLIMTUNE_CHECK_ARG(x.size(-1) == d_in, op, "x", "has ", x.size(-1), " features but 'lora_A' expects ", d_in);
  const auto at_ = lora_A.scalar_type();
  SLIMTUNE_CHECK_ARG(at_ == xt || at_ == at::kFloat, op, "lora_A", "must have the dtype of 'x' (", xt,
                     ") or float32, got ", at_);
  SLIMTUNE_CHECK_ARG(lora_B.scalar_type() == at_, op, "lora_B", "must have the dtype of 'lora_A' (", at_, "), got ",
                     lora_B.scalar_type());
  check_same_device(op, x, "x", lora_A, "lora_A");
  check_same_device(op, x, "x", lora_B, "lora_B");
  if (weight) {
    const at::Tensor& w = *weight;
    SLIMTUNE_CHECK_ARG(w.dim() == 2 && w.size(0) == d_out && w.size(1) == d_in, op, "weight", "must have shape (",
                       d_out, ", ", d_in, ") to match 'lora_B' and 'lora_A', got ", w.sizes());
    SLIMTUNE_CHECK_ARG(w.scalar_type() == xt, op, "weight", "must have the dtype of 'x' (", xt, "), got ",
                       w.scalar_type());
    check_same_device(op, x, "x", w, "weight");
  }
  if (bias) {
    const at::Tensor& b = *bias;
    SLIMTUNE_CHECK_ARG(b.dim() == 1 && b.size(0) == d_out, op, "bias", "must have shape (", d_out, "), got ",
                       b.sizes());
    SLIMTUNE_CHECK_ARG(b.scalar_type() == xt, op, "bias", "must have the dtype of 'x' (", xt, "), got ",
                       b.scalar_type());
    check_same_device(op, x, "x", b, "bias");
  }
  SLIMTUNE_CHECK_ARG(std::isfinite(scale), op, "scale", "must be finite, got ", scale);
  SLIMTUNE_CHECK_ARG(p >= 0.0 && p < 1.0, op, "dropout", "must be in [0, 1), got ", p);
}

// The seed: a one-element int64 tensor on x's device (so CUDA reads it in the kernel, without a
// host sync, and torch.compile traces it as a tensor); required when dropout > 0.
void check_seed(const char* op, const at::Tensor& x, const std::optional<at::Tensor>& seed, double p,
                const char* x_name = "x") {
  SLIMTUNE_CHECK_ARG(seed || p == 0.0, op, "seed", "must be given when dropout > 0 (got dropout ", p, ")");
  if (seed) check_seed_tensor(op, x, *seed, x_name);
}

void check_backward(const char* op, const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& xa, int64_t T,
                    int64_t r, int64_t d_out, at::ScalarType cdt) {
  SLIMTUNE_CHECK_ARG(grad_out.dim() >= 1 && grad_out.size(-1) == d_out && token_count(grad_out) == T, op, "grad_out",
                     "must have shape (..., ", d_out, ") with ", T, " rows, got ", grad_out.sizes());
  SLIMTUNE_CHECK_ARG(grad_out.scalar_type() == x.scalar_type(), op, "grad_out", "must have the dtype of 'x' (",
                     x.scalar_type(), "), got ", grad_out.scalar_type());
  SLIMTUNE_CHECK_ARG(xa.dim() == 2 && xa.size(0) == T && xa.size(1) == r && xa.scalar_type() == cdt, op, "xa",
                     "must be the (", T, ", ", r, ") ", cdt, " intermediate saved by forward, got ", xa.sizes(), " ",
                     xa.scalar_type());
  check_same_device(op, x, "x", grad_out, "grad_out");
}

constexpr const char* kMultiOp = "lora_linear_multi";

void check_lists(size_t n, size_t biases, size_t As, size_t Bs, size_t scales) {
  SLIMTUNE_CHECK_ARG(n >= 1, kMultiOp, "weights", "must hold at least one weight");
  SLIMTUNE_CHECK_ARG(biases == n, kMultiOp, "biases", "has ", biases, " entries but 'weights' has ", n);
  SLIMTUNE_CHECK_ARG(As == n, kMultiOp, "lora_As", "has ", As, " entries but 'weights' has ", n);
  SLIMTUNE_CHECK_ARG(Bs == n, kMultiOp, "lora_Bs", "has ", Bs, " entries but 'weights' has ", n);
  SLIMTUNE_CHECK_ARG(scales == n, kMultiOp, "scales", "has ", scales, " entries but 'weights' has ", n);
}

void check_dropout_p(const char* op, double p) {
  SLIMTUNE_CHECK_ARG(p >= 0.0 && p < 1.0, op, "p", "must be in [0, 1), got ", p);
}

// ---- the kernels of one backend ----

struct Kernels {
  const Backend& backend;
  // The passes over x and grad_out, and the scratch their split sums need.
  KernelEntry<DownParams> down;
  KernelEntry<GradParams> grad;
  int64_t (*down_partial)(int64_t, int64_t, int64_t);
  int64_t (*grad_partial)(int64_t, int64_t, int64_t, DType, bool);
  KernelEntry<DropoutMaskParams> dropout_mask;
  // Whether the gradient pass beats BLAS without dropout too (x dtype, K, x's column stride,
  // rank); null: never.
  bool (*grad_beats_blas)(DType, int64_t, int64_t, int64_t);
};

// One call's mask: seed (a value, or on a GPU a pointer to it in device memory), offset,
// threshold and the multiplier of a kept element.
struct Mask {
  uint64_t seed, offset;
  uint32_t thresh;
  double mult;
  const int64_t* seed_ptr;
  MaskParams params() const { return MaskParams{mult, thresh, seed, offset, seed_ptr}; }
};

Mask make_mask(const Kernels& k, double scale, double p, const std::optional<at::Tensor>& seed, int64_t offset) {
  Mask m{0, static_cast<uint64_t>(offset), p > 0.0 ? philox::threshold(p) : 0u, scale / (1.0 - p), nullptr};
  if (p > 0.0 && seed) {
    const SeedArg s = seed_arg(k.backend, *seed);
    m.seed = s.value;
    m.seed_ptr = s.ptr;
  }
  return m;
}

// No dropout: every element kept, multiplied by `mult`.
Mask plain_mask(double mult) { return Mask{0, 0, 0u, mult, nullptr}; }

// ---- the passes over x and grad_out ----

// The operand of a pass over src (T x K, any strides) with rows q0 .. q0 + n of a (null: none).
XOperand x_operand(const at::Tensor& src, const at::Tensor* a, int64_t q0, int64_t n, DType acc) {
  return XOperand{src.data_ptr(),
                  to_kernel_dtype(src.scalar_type()),
                  src.stride(0),
                  src.stride(1),
                  src.size(0),
                  src.size(1),
                  n,
                  a ? a->narrow(0, q0, n).data_ptr() : nullptr,
                  acc};
}

// out (T x R, acc dtype, unit column stride) = (keep * mult * src) a^T, src T x K (any strides),
// a R x K contiguous; kMaxRank rows of a per launch.
void down_pass(const Kernels& k, const at::Tensor& src, const at::Tensor& a, const Mask& m, const at::Tensor& out,
               const char* op) {
  const int64_t T = src.size(0), K = src.size(1), R = a.size(0);
  const DType acc = to_kernel_dtype(out.scalar_type());
  for (int64_t q0 = 0; q0 < R; q0 += kMaxRank) {
    const int64_t n = std::min(kMaxRank, R - q0);
    const int64_t elems = k.down_partial(T, K, n);
    const at::Tensor part = at::empty({elems}, out.options());
    const DownParams p{x_operand(src, &a, q0, n, acc), out.narrow(1, q0, n).data_ptr(), out.stride(0),
                       elems > 0 ? part.data_ptr() : nullptr, m.params()};
    check_status(k.backend, k.down(p, k.backend.stream(src)), op);
  }
}

// *dA (R x K contiguous) = gb^T (keep * mult * src) and *dx (T x K contiguous, src's dtype) =
// keep * mult * (gb a), one pass over src; gb T x R with unit column stride; either output may be
// null. With dots_a (Q x K contiguous), *dots (T x Q, unit column stride) = src dots_a^T from the
// same read (lora.h: where grad_beats_blas holds).
void grad_pass(const Kernels& k, const at::Tensor& src, const at::Tensor& gb, const at::Tensor* a, at::Tensor* dx,
               at::Tensor* dA, const Mask& m, const char* op, at::Tensor* dots = nullptr,
               const at::Tensor* dots_a = nullptr) {
  const int64_t T = src.size(0), K = src.size(1), R = gb.size(1);
  const DType acc = to_kernel_dtype(gb.scalar_type());
  for (int64_t q0 = 0; q0 < R; q0 += kMaxRank) {
    const int64_t n = std::min(kMaxRank, R - q0);
    const int64_t elems = k.grad_partial(T, K, n, acc, dA != nullptr);
    const at::Tensor part = at::empty({elems}, gb.options());
    const GradParams p{x_operand(src, a, q0, n, acc),
                       gb.narrow(1, q0, n).data_ptr(),
                       gb.stride(0),
                       dx ? dx->data_ptr() : nullptr,
                       q0 > 0,
                       dA ? dA->narrow(0, q0, n).data_ptr() : nullptr,
                       elems > 0 ? part.data_ptr() : nullptr,
                       m.params(),
                       dots && q0 == 0 ? dots->data_ptr() : nullptr,
                       dots ? dots->stride(0) : 0,
                       dots_a ? dots_a->size(0) : 0,
                       dots_a ? dots_a->data_ptr() : nullptr};
    check_status(k.backend, k.grad(p, k.backend.stream(src)), op);
  }
}

// Whether the gradient pass over a (T x K, column stride cs) tensor of this dtype with rank r
// beats BLAS without a mask.
bool beats_blas(const Kernels& k, at::ScalarType dtype, int64_t K, int64_t cs, int64_t r) {
  return k.grad_beats_blas != nullptr && k.grad_beats_blas(to_kernel_dtype(dtype), K, cs, r);
}

// gB = g B (T x R) and, when wanted, dB^T = xa^T g (R x d_out) and the bias gradient (d_out),
// from passes over g (no converted copy of g): where the gradient pass beats BLAS, all from one.
struct GradOutTerms {
  at::Tensor gB, dBt, dbias;
};

void grad_out_terms(const Kernels& k, const at::Tensor& g2, const at::Tensor& Bt, const at::Tensor& xa, bool need_B,
                    bool need_bias, GradOutTerms* res, const char* op) {
  const int64_t T = g2.size(0), d_out = g2.size(1), r = Bt.size(0);
  const auto opts = g2.options().dtype(xa.scalar_type());
  const bool same = g2.scalar_type() == xa.scalar_type();  // no conversion: g is read as it is
  const bool fused = same && (need_B || need_bias) && beats_blas(k, g2.scalar_type(), d_out, g2.stride(1), r);
  if (same && !fused) {
    at::mm_out(res->gB, g2, Bt.t());
    if (need_B) at::mm_out(res->dBt, xa.t(), g2);
    if (need_bias) at::sum_out(res->dbias, g2, 0);
    return;
  }
  if (!fused) down_pass(k, g2, Bt, plain_mask(1.0), res->gB, op);
  if (!need_B && !need_bias) return;
  // A column of ones after xa makes the bias gradient the last row of the same pass.
  const at::Tensor gb = need_bias ? at::cat({xa, at::ones({T, 1}, opts)}, 1) : xa.contiguous();
  at::Tensor dBx = at::empty({gb.size(1), d_out}, opts);
  grad_pass(k, g2, gb, nullptr, nullptr, &dBx, plain_mask(1.0), op, fused ? &res->gB : nullptr, fused ? &Bt : nullptr);
  if (need_B) res->dBt.copy_(dBx.narrow(0, 0, r));
  if (need_bias) res->dbias.copy_(dBx[r]);
}

// ---- the drivers (one per op, every backend) ----

// The accumulation dtype: float64 when x or the adapters are float64 (float32 adapters over a
// float64 x must not round x, g B A or dx to float32), float32 otherwise.
at::ScalarType compute_dtype(const at::Tensor& x, const at::Tensor& lora_A) {
  return x.scalar_type() == at::kDouble ? at::kDouble : acc_scalar_type(lora_A.scalar_type());
}

// Without dropout x may go straight to a BLAS GEMM when no dtype conversion is needed.
bool direct(const at::Tensor& x, const at::Tensor& lora_A, double p) {
  const auto cdt = compute_dtype(x, lora_A);
  return p == 0.0 && x.scalar_type() == cdt && lora_A.scalar_type() == cdt;
}

// xa = scale * dropout(x2) A^T (T x r, accumulation dtype), one pass over x2 (T x d_in).
at::Tensor lora_down(const Kernels& k, const at::Tensor& x2, const at::Tensor& lora_A, double scale, double p,
                     const Mask& m, const char* op) {
  const auto cdt = compute_dtype(x2, lora_A);
  if (direct(x2, lora_A, p)) return at::mm(x2, lora_A.t()).mul_(scale);
  at::Tensor xa = at::empty({x2.size(0), lora_A.size(0)}, x2.options().dtype(cdt));
  down_pass(k, x2, lora_A.to(cdt).contiguous(), m, xa, op);
  return xa;
}

// *dx = scale * (gB A) * mask / (1 - p) (allocated in x2's dtype; the caller adds the base GEMM into
// it, so dx is read and written once less) and *dA = scale * gB^T (x2 * mask / (1 - p))
// (accumulation dtype), the mask regenerated from (seed, offset), one pass over x2; either
// pointer may be null.
void lora_dropout_grads(const Kernels& k, const at::Tensor& x2, const at::Tensor& gB, const at::Tensor& lora_A,
                        double scale, double p, const Mask& m, at::Tensor* dx, at::Tensor* dA, const char* op) {
  if (!dx && !dA) return;
  const auto cdt = compute_dtype(x2, lora_A);
  const at::Tensor Ac = lora_A.to(cdt).contiguous();
  if (dx) *dx = at::empty({x2.size(0), x2.size(1)}, x2.options());  // written whole
  if (direct(x2, lora_A, p) && !beats_blas(k, x2.scalar_type(), x2.size(1), x2.stride(1), lora_A.size(0))) {
    const at::Tensor gs = gB * scale;  // T x r: the scale folded in before the T x d_in product
    if (dx) at::mm_out(*dx, gs, Ac);
    if (dA) *dA = at::mm(gs.t(), x2);
    return;
  }
  if (dA) *dA = at::empty({lora_A.size(0), lora_A.size(1)}, x2.options().dtype(cdt));  // written whole
  if (dx && lora_A.size(0) == 0) dx->zero_();  // no pass runs
  grad_pass(k, x2, gB, &Ac, dx, dA, m, op);
}

// y (T x d_out, dtype odt) = xa B^T (+ bias), y written once: by the gradient pass (its dx term,
// every element kept, the bias as one more rank) where that beats BLAS, else by a GEMM with B^T
// made contiguous (r x d_out, small: BLAS is far slower on the (d_out x r)^T layout for small r).
at::Tensor up_projection(const Kernels& k, const at::Tensor& xa, const at::Tensor& lora_B,
                         const std::optional<at::Tensor>& bias, at::ScalarType odt, const char* op) {
  const int64_t T = xa.size(0), d_out = lora_B.size(0);
  if (xa.scalar_type() == odt && beats_blas(k, odt, d_out, 1, xa.size(1))) {
    const at::Tensor gb = bias ? at::cat({xa, at::ones({T, 1}, xa.options())}, 1) : xa.contiguous();
    const at::Tensor a =
        bias ? at::cat({lora_B.t().to(odt), bias->unsqueeze(0)}, 0) : lora_B.t().to(odt).contiguous();
    at::Tensor y = at::empty({T, d_out}, xa.options());
    if (gb.size(1) == 0) return y.zero_();  // rank 0, no bias: no pass runs
    grad_pass(k, y, gb, &a, &y, nullptr, plain_mask(1.0), op);  // without dA no x is read: y gives the shape
    return y;
  }
  const at::Tensor up = xa.to(odt), Bt = lora_B.t().to(odt).contiguous();
  return bias ? at::addmm(*bias, up, Bt) : at::mm(up, Bt);
}

std::tuple<at::Tensor, at::Tensor> forward_op(const Kernels& k, const at::Tensor& x,
                                              const std::optional<at::Tensor>& weight,
                                              const std::optional<at::Tensor>& bias, const at::Tensor& lora_A,
                                              const at::Tensor& lora_B, double scale, double p,
                                              const std::optional<at::Tensor>& seed, int64_t offset) {
  constexpr const char* op = "lora_linear";
  check_lora(op, x, weight, bias, lora_A, lora_B, scale, p);
  check_seed(op, x, seed, p);
  check_backend(k.backend, op, x, "x");
  c10::DeviceGuard guard(x.device());
  const int64_t d_out = lora_B.size(0);
  const at::Tensor x2 = as_token_rows(x);
  const at::Tensor xa = lora_down(k, x2, lora_A, scale, p, make_mask(k, scale, p, seed, offset), op);

  // The up-projection (and bias) first, the base GEMM accumulated into it: y is written once
  // and read back inside the big GEMM's tiles, no separate pass over y.
  at::Tensor out = up_projection(k, xa, lora_B, bias, x.scalar_type(), op);
  if (weight) out.addmm_(x2, weight->t());
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = d_out;
  return {out.view(shape), xa};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_op(
    const Kernels& k, const at::Tensor& grad_out, const at::Tensor& x, const std::optional<at::Tensor>& weight,
    const at::Tensor& lora_A, const at::Tensor& lora_B, const at::Tensor& xa, double scale, double p,
    const std::optional<at::Tensor>& seed, int64_t offset, bool need_x, bool need_A, bool need_B, bool need_bias) {
  constexpr const char* op = "lora_linear_backward";
  check_lora(op, x, weight, std::nullopt, lora_A, lora_B, scale, p);
  check_seed(op, x, seed, p);
  const int64_t r = lora_A.size(0), d_out = lora_B.size(0);
  const at::Tensor x2 = as_token_rows(x);
  const int64_t T = x2.size(0);
  const auto cdt = compute_dtype(x, lora_A);
  check_backward(op, grad_out, x, xa, T, r, d_out, cdt);
  check_backend(k.backend, op, x, "x");
  c10::DeviceGuard guard(x.device());
  at::NoGradGuard no_grad;  // a backward is not differentiated (its out= GEMMs would refuse)
  const at::Tensor g2 = as_token_rows(grad_out);
  // B^T (r x d_out) contiguous: see up_projection.
  const at::Tensor Bt = lora_B.t().to(cdt).contiguous();
  const at::Tensor none = at::empty({0}, x.options());

  // gB = g B, dB^T = xa^T g (xa already holds the scale s) and the bias gradient.
  GradOutTerms terms{at::empty({T, r}, x.options().dtype(cdt)),
                     need_B ? at::zeros({r, d_out}, x.options().dtype(cdt)) : none,
                     need_bias ? at::zeros({d_out}, x.options().dtype(cdt)) : none};
  grad_out_terms(k, g2, Bt, xa, need_B, need_bias, &terms, op);

  at::Tensor dx = none, dA = none;
  lora_dropout_grads(k, x2, terms.gB, lora_A, scale, p, make_mask(k, scale, p, seed, offset),
                     need_x ? &dx : nullptr, need_A ? &dA : nullptr, op);
  if (need_x && weight) dx.addmm_(g2, *weight);
  if (need_x) dx = dx.view(x.sizes());
  if (need_A) dA = dA.to(lora_A.scalar_type());
  const at::Tensor dB = need_B ? terms.dBt.t().to(lora_B.scalar_type()).contiguous() : none;
  const at::Tensor dbias = need_bias ? terms.dbias.to(x.scalar_type()) : none;
  return {dx, dA, dB, dbias};
}

// Q/K/V-style LoRA: several adapted projections of one input. The down-projections of all
// adapters run as one (their A's stacked, scales folded in), so x is read once and one
// dropout mask serves them all; the base GEMMs and up-projections stay per projection.

// [s_i A_i] stacked (sum r_i x d_in) in the accumulation dtype, and each adapter's row offset.
at::Tensor stacked_A(const at::Tensor& x, at::TensorList As, at::ArrayRef<double> scales,
                     std::vector<int64_t>* offsets) {
  const auto cdt = compute_dtype(x, As[0]);
  std::vector<at::Tensor> parts;
  int64_t off = 0;
  for (size_t i = 0; i < As.size(); ++i) {
    SLIMTUNE_CHECK_ARG(As[i].scalar_type() == As[0].scalar_type(), kMultiOp, "lora_As",
                       "must share one dtype; entry ", i, " is ", As[i].scalar_type(), " but entry 0 is ",
                       As[0].scalar_type());
    parts.push_back(As[i].to(cdt) * scales[i]);
    offsets->push_back(off);
    off += As[i].size(0);
  }
  return at::cat(parts, 0);
}

std::optional<at::Tensor> bias_at(at::TensorList biases, size_t i) {
  if (biases[i].numel() == 0) return std::nullopt;
  return biases[i];
}

std::tuple<std::vector<at::Tensor>, at::Tensor> multi_forward_op(const Kernels& k, const at::Tensor& x,
                                                                 at::TensorList weights, at::TensorList biases,
                                                                 at::TensorList lora_As, at::TensorList lora_Bs,
                                                                 at::ArrayRef<double> scales, double p,
                                                                 const std::optional<at::Tensor>& seed,
                                                                 int64_t offset) {
  const size_t n = weights.size();
  check_lists(n, biases.size(), lora_As.size(), lora_Bs.size(), scales.size());
  for (size_t i = 0; i < n; ++i) {
    check_lora(kMultiOp, x, weights[i], bias_at(biases, i), lora_As[i], lora_Bs[i], scales[i], p);
  }
  check_seed(kMultiOp, x, seed, p);
  check_backend(k.backend, kMultiOp, x, "x");
  c10::DeviceGuard guard(x.device());
  const at::Tensor x2 = as_token_rows(x);
  std::vector<int64_t> offs;
  const at::Tensor A = stacked_A(x, lora_As, scales, &offs);
  const at::Tensor xa = lora_down(k, x2, A, 1.0, p, make_mask(k, 1.0, p, seed, offset), kMultiOp);
  std::vector<at::Tensor> outs;
  for (size_t i = 0; i < n; ++i) {
    // As in forward_op: the up-projection (and bias) first, the base GEMM accumulated into it.
    at::Tensor out = up_projection(k, xa.narrow(1, offs[i], lora_As[i].size(0)), lora_Bs[i], bias_at(biases, i),
                                   x.scalar_type(), kMultiOp);
    out.addmm_(x2, weights[i].t());
    std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
    shape.back() = weights[i].size(0);
    outs.push_back(out.view(shape));
  }
  return {outs, xa};
}

std::tuple<at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>> multi_backward_op(
    const Kernels& k, at::TensorList grad_outs, const at::Tensor& x, at::TensorList weights, at::TensorList lora_As,
    at::TensorList lora_Bs, const at::Tensor& xa, at::ArrayRef<double> scales, double p,
    const std::optional<at::Tensor>& seed, int64_t offset, bool need_x, bool need_A, bool need_B,
    const c10::List<bool>& need_bias) {
  const size_t n = weights.size();
  check_lists(n, n, lora_As.size(), lora_Bs.size(), scales.size());
  SLIMTUNE_CHECK_ARG(grad_outs.size() == n, kMultiOp, "grad_outs", "has ", grad_outs.size(), " entries, expected ",
                     n);
  SLIMTUNE_CHECK_ARG(need_bias.size() == n, kMultiOp, "need_bias", "has ", need_bias.size(), " entries, expected ",
                     n);
  for (size_t i = 0; i < n; ++i) {
    check_lora(kMultiOp, x, weights[i], std::nullopt, lora_As[i], lora_Bs[i], scales[i], p);
  }
  check_seed(kMultiOp, x, seed, p);
  check_backend(k.backend, kMultiOp, x, "x");
  c10::DeviceGuard guard(x.device());
  at::NoGradGuard no_grad;  // a backward is not differentiated (its out= GEMMs would refuse)
  const at::Tensor x2 = as_token_rows(x);
  const int64_t T = x2.size(0);
  const auto cdt = compute_dtype(x, lora_As[0]);
  std::vector<int64_t> offs;
  const at::Tensor A = stacked_A(x, lora_As, scales, &offs);
  SLIMTUNE_CHECK_ARG(xa.dim() == 2 && xa.size(0) == T && xa.size(1) == A.size(0) && xa.scalar_type() == cdt,
                     kMultiOp, "xa", "must be the (", T, ", ", A.size(0), ") intermediate saved by forward, got ",
                     xa.sizes());
  const at::Tensor none = at::empty({0}, x.options());

  // gB = [g_i B_i]_i, dB_i = g_i^T xa_i (xa_i holds s_i) and the bias gradients.
  at::Tensor gB = at::empty({T, A.size(0)}, x.options().dtype(cdt));
  std::vector<at::Tensor> dBs, dbiases;
  for (size_t i = 0; i < n; ++i) {
    const int64_t d_out = lora_Bs[i].size(0), r = lora_As[i].size(0);
    SLIMTUNE_CHECK_ARG(grad_outs[i].dim() >= 1 && grad_outs[i].size(-1) == d_out && token_count(grad_outs[i]) == T &&
                           grad_outs[i].scalar_type() == x.scalar_type(),
                       kMultiOp,
                       "grad_outs", "entry ", i, " must be a (..., ", d_out, ") ", x.scalar_type(), " tensor with ",
                       T, " rows, got ", grad_outs[i].sizes(), " ", grad_outs[i].scalar_type());
    check_same_device(kMultiOp, x, "x", grad_outs[i], "grad_outs");
    GradOutTerms terms{gB.narrow(1, offs[i], r),
                       need_B ? at::zeros({r, d_out}, x.options().dtype(cdt)) : none,  // dB^T
                       need_bias.get(i) ? at::zeros({d_out}, x.options().dtype(cdt)) : none};
    grad_out_terms(k, as_token_rows(grad_outs[i]), lora_Bs[i].t().to(cdt).contiguous(),
                   xa.narrow(1, offs[i], r), need_B, need_bias.get(i), &terms, kMultiOp);
    dBs.push_back(terms.dBt);
    dbiases.push_back(terms.dbias);
  }

  at::Tensor dx = none, dA = none;
  lora_dropout_grads(k, x2, gB, A, 1.0, p, make_mask(k, 1.0, p, seed, offset), need_x ? &dx : nullptr,
                     need_A ? &dA : nullptr, kMultiOp);
  if (need_x) {
    for (size_t i = 0; i < n; ++i) dx.addmm_(as_token_rows(grad_outs[i]), weights[i]);
  }
  std::vector<at::Tensor> dAs;
  for (size_t i = 0; i < n; ++i) {
    dAs.push_back(need_A ? (dA.narrow(0, offs[i], lora_As[i].size(0)) * scales[i]).to(lora_As[i].scalar_type())
                         : none);
    if (need_B) dBs[i] = dBs[i].t().to(lora_Bs[i].scalar_type()).contiguous();
    if (need_bias.get(i)) dbiases[i] = dbiases[i].to(x.scalar_type());
  }
  if (need_x) dx = dx.view(x.sizes());
  return {dx, dAs, dBs, dbiases};
}

// The keep mask (bool, shape of `like`) the ops above use.
at::Tensor dropout_mask_op(const Kernels& k, const at::Tensor& like, double p, const at::Tensor& seed,
                           int64_t offset) {
  constexpr const char* op = "lora_dropout_mask";
  check_dropout_p(op, p);
  check_backend(k.backend, op, like, "like");
  check_seed(op, like, seed, p, "like");
  c10::DeviceGuard guard(like.device());
  at::Tensor out = at::empty(like.sizes(), like.options().dtype(at::kBool));
  const Mask m = make_mask(k, 1.0, p, seed, offset);
  const DropoutMaskParams params{out.data_ptr<bool>(), out.numel(), m.thresh, m.seed, m.offset, m.seed_ptr};
  check_status(k.backend, k.dropout_mask(params, k.backend.stream(out)), op);
  return out;
}

// ---- registration ----

constexpr std::array<const char*, 5> kOps{"lora_linear", "lora_linear_backward", "lora_linear_multi",
                                          "lora_linear_multi_backward", "lora_dropout_mask"};

// Binds the drivers to one backend's kernels: the dispatcher needs plain functions.
template <const Kernels& K>
struct Bound {
  static std::tuple<at::Tensor, at::Tensor> forward(const at::Tensor& x, const std::optional<at::Tensor>& weight,
                                                    const std::optional<at::Tensor>& bias, const at::Tensor& lora_A,
                                                    const at::Tensor& lora_B, double scale, double p,
                                                    const std::optional<at::Tensor>& seed, int64_t offset) {
    return forward_op(K, x, weight, bias, lora_A, lora_B, scale, p, seed, offset);
  }
  static std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward(
      const at::Tensor& grad_out, const at::Tensor& x, const std::optional<at::Tensor>& weight,
      const at::Tensor& lora_A, const at::Tensor& lora_B, const at::Tensor& xa, double scale, double p,
      const std::optional<at::Tensor>& seed, int64_t offset, bool need_x, bool need_A, bool need_B, bool need_bias) {
    return backward_op(K, grad_out, x, weight, lora_A, lora_B, xa, scale, p, seed, offset, need_x, need_A, need_B,
                       need_bias);
  }
  static std::tuple<std::vector<at::Tensor>, at::Tensor> multi_forward(const at::Tensor& x, at::TensorList weights,
                                                                       at::TensorList biases, at::TensorList lora_As,
                                                                       at::TensorList lora_Bs,
                                                                       at::ArrayRef<double> scales, double p,
                                                                       const std::optional<at::Tensor>& seed,
                                                                       int64_t offset) {
    return multi_forward_op(K, x, weights, biases, lora_As, lora_Bs, scales, p, seed, offset);
  }
  static std::tuple<at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>>
  multi_backward(at::TensorList grad_outs, const at::Tensor& x, at::TensorList weights, at::TensorList lora_As,
                 at::TensorList lora_Bs, const at::Tensor& xa, at::ArrayRef<double> scales, double p,
                 const std::optional<at::Tensor>& seed, int64_t offset, bool need_x, bool need_A, bool need_B,
                 const c10::List<bool>& need_bias) {
    return multi_backward_op(K, grad_outs, x, weights, lora_As, lora_Bs, xa, scales, p, seed, offset, need_x, need_A,
                             need_B, need_bias);
  }
  static at::Tensor dropout_mask(const at::Tensor& like, double p, const at::Tensor& seed, int64_t offset) {
    return dropout_mask_op(K, like, p, seed, offset);
  }
  static void register_all(torch::Library& m) {
    impl_ops(m, kOps, &forward, &backward, &multi_forward, &multi_backward, &dropout_mask);
  }
};

#ifndef SLIMTUNE_HOST_EMULATION
const Kernels kCpuKernels{kCpuBackend, &down_cpu, &grad_cpu, &down_partial_elems_cpu, &grad_partial_elems_cpu,
                          &dropout_mask_cpu, &grad_beats_blas_cpu};
#endif
#ifdef SLIMTUNE_HAS_GPU
const Kernels kGpuKernels{kGpuBackend, &down_cuda, &grad_cuda, &down_partial_elems_cuda,
                          &grad_partial_elems_cuda, &dropout_mask_cuda, nullptr};
#endif

}  // namespace
}  // namespace lora

void define_lora_schemas(torch::Library& m) {
  // y = x W^T (+ bias) + scale * (dropout(x) A^T) B^T with a Philox mask regenerated from
  // (seed, offset); also returns xa = scale * dropout(x) A^T (T x r), kept for backward. The seed
  // is a one-element int64 tensor on x's device (required when dropout > 0): a tensor, so
  // torch.compile traces a freshly drawn seed without a graph break or a guard on its value.
  m.def("lora_linear(Tensor x, Tensor? weight, Tensor? bias, Tensor lora_A, Tensor lora_B, float scale, "
        "float dropout, Tensor? seed, int offset) -> (Tensor, Tensor)");
  m.def("lora_linear_backward(Tensor grad_out, Tensor x, Tensor? weight, Tensor lora_A, Tensor lora_B, Tensor xa, "
        "float scale, float dropout, Tensor? seed, int offset, bool need_x, bool need_A, bool need_B, "
        "bool need_bias) -> (Tensor, Tensor, Tensor, Tensor)");
  // Several projections of one x (Q/K/V): x read once for all adapters, one dropout mask.
  // An empty (0-element) entry of `biases` means no bias for that projection.
  m.def("lora_linear_multi(Tensor x, Tensor[] weights, Tensor[] biases, Tensor[] lora_As, Tensor[] lora_Bs, "
        "float[] scales, float dropout, Tensor? seed, int offset) -> (Tensor[], Tensor)");
  m.def("lora_linear_multi_backward(Tensor[] grad_outs, Tensor x, Tensor[] weights, Tensor[] lora_As, "
        "Tensor[] lora_Bs, Tensor xa, float[] scales, float dropout, Tensor? seed, int offset, bool need_x, "
        "bool need_A, bool need_B, bool[] need_bias) -> (Tensor, Tensor[], Tensor[], Tensor[])");
  // The keep mask (bool, shape of `like`) lora_linear uses; for tests and inspection only.
  m.def("lora_dropout_mask(Tensor like, float p, Tensor seed, int offset) -> Tensor");
}

}  // namespace slimtune

SLIMTUNE_REGISTER_FAMILY(slimtune::define_lora_schemas, slimtune::lora)
