#include "ops/lora.h"

#include <algorithm>
#include <cmath>

#include <torch/library.h>

#include "cpu/lora_dropout.h"
#include "cuda/philox.h"
#include "ops/common.h"

namespace slimtune {
namespace {

int64_t tile_rows(const LoraKernels& k, int64_t cols) { return std::max<int64_t>(1, k.tile_elems / std::max<int64_t>(cols, 1)); }

// The dropout-free path may hand x straight to a GEMM when no dtype conversion is needed.
bool direct(const at::Tensor& x, const at::Tensor& lora_A, double p) {
  const auto cdt = lora_compute_dtype(x, lora_A);
  return p == 0.0 && x.scalar_type() == cdt && lora_A.scalar_type() == cdt;
}

}  // namespace

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

at::Tensor lora_down(const LoraKernels& k, const at::Tensor& x2, const at::Tensor& lora_A, double scale, double p,
                     int64_t seed, int64_t offset) {
  const int64_t r = lora_A.size(0), d_in = lora_A.size(1), T = x2.size(0);
  const auto cdt = lora_compute_dtype(x2, lora_A);
  // xa = s * dropout(x) A^T, one pass over x; a dropped tile lives only in `scratch`.
  if (direct(x2, lora_A, p)) return at::mm(x2, lora_A.t()).mul_(scale);
  at::Tensor xa = at::empty({T, r}, x2.options().dtype(cdt));
  const at::Tensor At = lora_A.to(cdt).t();
  const int64_t rows = std::min(tile_rows(k, d_in), std::max<int64_t>(T, 1));
  at::Tensor scratch = at::empty({rows, d_in}, x2.options().dtype(cdt));
  const uint32_t thresh = p > 0.0 ? philox::threshold(p) : 0u;
  const double mult = scale / (1.0 - p);
  for (int64_t t0 = 0; t0 < T; t0 += rows) {
    const int64_t n = std::min(rows, T - t0);
    at::Tensor tile = scratch.narrow(0, 0, n);
    k.dropout_scale(x2.narrow(0, t0, n), t0 * d_in, mult, thresh, static_cast<uint64_t>(seed),
                    static_cast<uint64_t>(offset), tile);
    at::Tensor dst = xa.narrow(0, t0, n);
    at::mm_out(dst, tile, At);
  }
  return xa;
}

void lora_dropout_grads(const LoraKernels& k, const at::Tensor& x2, const at::Tensor& gB, const at::Tensor& lora_A,
                        double scale, double p, int64_t seed, int64_t offset, at::Tensor* dx, at::Tensor* dA) {
  const int64_t r = lora_A.size(0), d_in = lora_A.size(1), T = x2.size(0);
  const auto cdt = lora_compute_dtype(x2, lora_A);
  const at::Tensor Ac = lora_A.to(cdt);
  const bool use_direct = direct(x2, lora_A, p);
  if (dx && use_direct) dx->addmm_(gB, Ac, 1.0, scale);
  if (dA) *dA = use_direct ? at::mm(gB.t(), x2).mul_(scale) : at::zeros({r, d_in}, x2.options().dtype(cdt));
  if (use_direct || (!dx && !dA)) return;
  // dx += s (gB A) * mask / (1 - p) and dA += gB^T (s x * mask / (1 - p)), the mask
  // regenerated from the seed, one tile of rows at a time.
  const uint64_t useed = static_cast<uint64_t>(seed), uoff = static_cast<uint64_t>(offset);
  const uint32_t thresh = p > 0.0 ? philox::threshold(p) : 0u;
  const double mult = scale / (1.0 - p);
  const int64_t rows = std::min(tile_rows(k, d_in), std::max<int64_t>(T, 1));
  at::Tensor scratch = at::empty({rows, d_in}, x2.options().dtype(cdt));
  at::Tensor scratch2 = dx && dA ? at::empty({rows, d_in}, x2.options().dtype(cdt)) : scratch;
  for (int64_t t0 = 0; t0 < T; t0 += rows) {
    const int64_t n = std::min(rows, T - t0);
    at::Tensor tile = scratch.narrow(0, 0, n);
    const at::Tensor gBt = gB.narrow(0, t0, n);
    const at::Tensor xt = x2.narrow(0, t0, n);
    if (dx && dA) {
      at::Tensor xd = scratch2.narrow(0, 0, n);
      at::mm_out(tile, gBt, Ac);
      at::Tensor dxt = dx->narrow(0, t0, n);
      k.backward_tile(xt, tile, dxt, t0 * d_in, mult, thresh, useed, uoff, xd);
      dA->addmm_(gBt.t(), xd);
    } else if (dA) {
      k.dropout_scale(xt, t0 * d_in, mult, thresh, useed, uoff, tile);
      dA->addmm_(gBt.t(), tile);
    } else {
      at::mm_out(tile, gBt, Ac);
      at::Tensor dxt = dx->narrow(0, t0, n);
      k.masked_add(dxt, tile, t0 * d_in, mult, thresh, useed, uoff, true);
    }
  }
}

std::tuple<at::Tensor, at::Tensor> lora_forward(const LoraKernels& k, const at::Tensor& x,
                                                const std::optional<at::Tensor>& weight,
                                                const std::optional<at::Tensor>& bias, const at::Tensor& lora_A,
                                                const at::Tensor& lora_B, double scale, double p, int64_t seed,
                                                int64_t offset) {
  check_lora("lora_linear", x, weight, bias, lora_A, lora_B, scale, p);
  const int64_t d_in = lora_A.size(1), d_out = lora_B.size(0);
  const at::Tensor x2 = x.reshape({-1, d_in});
  const int64_t T = x2.size(0);

  at::Tensor out;
  if (weight) {
    out = bias ? at::addmm(*bias, x2, weight->t()) : at::mm(x2, weight->t());
  } else {
    out = bias ? bias->unsqueeze(0).expand({T, d_out}).contiguous() : at::zeros({T, d_out}, x.options());
  }

  const at::Tensor xa = lora_down(k, x2, lora_A, scale, p, seed, offset);

  // Up-projection accumulated into the base output: no T x d_out temporary. B^T is made
  // contiguous (r x d_out, small): BLAS is far slower on the (d_out x r)^T layout for small r.
  const auto odt = out.scalar_type();
  out.addmm_(xa.to(odt), lora_B.t().to(odt).contiguous());
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = d_out;
  return {out.view(shape), xa};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> lora_backward(
    const LoraKernels& k, const at::Tensor& grad_out, const at::Tensor& x, const std::optional<at::Tensor>& weight,
    const at::Tensor& lora_A, const at::Tensor& lora_B, const at::Tensor& xa, double scale, double p, int64_t seed,
    int64_t offset, bool need_x, bool need_A, bool need_B, bool need_bias) {
  constexpr const char* op = "lora_linear_backward";
  check_lora(op, x, weight, std::nullopt, lora_A, lora_B, scale, p);
  const int64_t r = lora_A.size(0), d_in = lora_A.size(1), d_out = lora_B.size(0);
  const at::Tensor x2 = x.reshape({-1, d_in});
  const int64_t T = x2.size(0);
  const auto cdt = lora_compute_dtype(x, lora_A);
  SLIMTUNE_CHECK_ARG(grad_out.numel() == T * d_out && grad_out.size(-1) == d_out, op, "grad_out", "must have shape ",
                     "(..., ", d_out, ") with ", T, " rows, got ", grad_out.sizes());
  SLIMTUNE_CHECK_ARG(grad_out.scalar_type() == x.scalar_type(), op, "grad_out", "must have the dtype of 'x' (",
                     x.scalar_type(), "), got ", grad_out.scalar_type());
  SLIMTUNE_CHECK_ARG(xa.dim() == 2 && xa.size(0) == T && xa.size(1) == r && xa.scalar_type() == cdt, op, "xa",
                     "must be the (", T, ", ", r, ") ", cdt, " intermediate saved by forward, got ", xa.sizes(), " ",
                     xa.scalar_type());
  check_same_device(op, x, "x", grad_out, "grad_out");
  const at::Tensor g2 = grad_out.reshape({-1, d_out});
  // B^T (r x d_out) contiguous: see lora_forward.
  const at::Tensor Bt = lora_B.t().to(cdt).contiguous();
  const at::Tensor none = at::empty({0}, x.options());

  // One read of g per tile: gB = g B and dB^T += xa^T g (xa already holds the scale s) and the
  // bias gradient, while the tile is in cache. Tiles run in order: deterministic sums.
  at::Tensor gB = at::empty({T, r}, x.options().dtype(cdt));
  at::Tensor dBt = at::zeros({r, d_out}, x.options().dtype(cdt));
  at::Tensor dbias = need_bias ? at::zeros({d_out}, x.options().dtype(cdt)) : none;
  {
    const int64_t rows = std::min(tile_rows(k, d_out), std::max<int64_t>(T, 1));
    for (int64_t t0 = 0; t0 < T; t0 += rows) {
      const int64_t n = std::min(rows, T - t0);
      const at::Tensor gt = g2.narrow(0, t0, n).to(cdt);
      at::Tensor gBt = gB.narrow(0, t0, n);
      at::mm_out(gBt, gt, Bt.t());
      if (need_B) dBt.addmm_(xa.narrow(0, t0, n).t(), gt);
      if (need_bias) dbias.add_(gt.sum(0));
    }
  }

  at::Tensor dx = none, dA = none;
  if (need_x) dx = weight ? at::mm(g2, *weight) : at::zeros({T, d_in}, x.options());
  lora_dropout_grads(k, x2, gB, lora_A, scale, p, seed, offset, need_x ? &dx : nullptr, need_A ? &dA : nullptr);
  if (need_x) dx = dx.view(x.sizes());
  if (need_A) dA = dA.to(lora_A.scalar_type());
  const at::Tensor dB = need_B ? dBt.t().to(lora_B.scalar_type()).contiguous() : none;
  if (need_bias) dbias = dbias.to(x.scalar_type());
  return {dx, dA, dB, dbias};
}

const LoraKernels kLoraCpu{&cpu::lora_dropout_scale, &cpu::lora_masked_add, &cpu::lora_dropout_backward_tile,
                           1 << 18};

namespace {

const LoraKernels& kCpu = kLoraCpu;

std::tuple<at::Tensor, at::Tensor> forward_cpu(const at::Tensor& x, const std::optional<at::Tensor>& weight,
                                               const std::optional<at::Tensor>& bias, const at::Tensor& lora_A,
                                               const at::Tensor& lora_B, double scale, double p, int64_t seed,
                                               int64_t offset) {
  return lora_forward(kCpu, x, weight, bias, lora_A, lora_B, scale, p, seed, offset);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& x, const std::optional<at::Tensor>& weight,
    const at::Tensor& lora_A, const at::Tensor& lora_B, const at::Tensor& xa, double scale, double p, int64_t seed,
    int64_t offset, bool need_x, bool need_A, bool need_B, bool need_bias) {
  return lora_backward(kCpu, grad_out, x, weight, lora_A, lora_B, xa, scale, p, seed, offset, need_x, need_A, need_B,
                       need_bias);
}

at::Tensor mask_cpu(const at::Tensor& like, double p, int64_t seed, int64_t offset) {
  SLIMTUNE_CHECK_ARG(p >= 0.0 && p < 1.0, "lora_dropout_mask", "p", "must be in [0, 1), got ", p);
  at::Tensor out = at::empty(like.sizes(), like.options().dtype(at::kBool));
  cpu::lora_dropout_mask(out, p > 0.0 ? philox::threshold(p) : 0u, static_cast<uint64_t>(seed),
                         static_cast<uint64_t>(offset));
  return out;
}

}  // namespace
}  // namespace slimtune

TORCH_LIBRARY_IMPL(slimtune, CPU, m) {
  m.impl("lora_linear", &slimtune::forward_cpu);
  m.impl("lora_linear_backward", &slimtune::backward_cpu);
  m.impl("lora_dropout_mask", &slimtune::mask_cpu);
}
