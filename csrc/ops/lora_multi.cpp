// Q/K/V-style LoRA: several adapted projections of one input. The down-projections of all
// adapters run as one (their A's stacked, scales folded in), so x is read once and one
// dropout mask serves them all; the base GEMMs and up-projections stay per projection.
#include <torch/library.h>

#include "ops/common.h"
#include "ops/lora.h"

namespace slimtune {
namespace {

constexpr const char* kOp = "lora_linear_multi";

void check_lists(size_t n, size_t biases, size_t As, size_t Bs, size_t scales) {
  SLIMTUNE_CHECK_ARG(n >= 1, kOp, "weights", "must hold at least one weight");
  SLIMTUNE_CHECK_ARG(biases == n, kOp, "biases", "has ", biases, " entries but 'weights' has ", n);
  SLIMTUNE_CHECK_ARG(As == n, kOp, "lora_As", "has ", As, " entries but 'weights' has ", n);
  SLIMTUNE_CHECK_ARG(Bs == n, kOp, "lora_Bs", "has ", Bs, " entries but 'weights' has ", n);
  SLIMTUNE_CHECK_ARG(scales == n, kOp, "scales", "has ", scales, " entries but 'weights' has ", n);
}

// [s_i A_i] stacked (sum r_i x d_in) in the compute dtype, and each adapter's row offset.
at::Tensor stacked_A(const at::Tensor& x, at::TensorList As, at::ArrayRef<double> scales,
                     std::vector<int64_t>* offsets) {
  const auto cdt = lora_compute_dtype(x, As[0]);
  std::vector<at::Tensor> parts;
  int64_t off = 0;
  for (size_t i = 0; i < As.size(); ++i) {
    SLIMTUNE_CHECK_ARG(As[i].scalar_type() == As[0].scalar_type(), kOp, "lora_As", "must share one dtype; entry ",
                       i, " is ", As[i].scalar_type(), " but entry 0 is ", As[0].scalar_type());
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

}  // namespace

std::tuple<std::vector<at::Tensor>, at::Tensor> lora_multi_forward(
    const LoraKernels& k, const at::Tensor& x, at::TensorList weights, at::TensorList biases,
    at::TensorList lora_As, at::TensorList lora_Bs, at::ArrayRef<double> scales, double p, int64_t seed,
    int64_t offset) {
  const size_t n = weights.size();
  check_lists(n, biases.size(), lora_As.size(), lora_Bs.size(), scales.size());
  for (size_t i = 0; i < n; ++i) {
    check_lora(kOp, x, weights[i], bias_at(biases, i), lora_As[i], lora_Bs[i], scales[i], p);
  }
  const int64_t d_in = lora_As[0].size(1);
  const at::Tensor x2 = x.reshape({-1, d_in});
  std::vector<int64_t> offs;
  const at::Tensor A = stacked_A(x, lora_As, scales, &offs);
  const at::Tensor xa = lora_down(k, x2, A, 1.0, p, seed, offset);
  std::vector<at::Tensor> outs;
  for (size_t i = 0; i < n; ++i) {
    const std::optional<at::Tensor> b = bias_at(biases, i);
    at::Tensor out = b ? at::addmm(*b, x2, weights[i].t()) : at::mm(x2, weights[i].t());
    const auto odt = out.scalar_type();
    // B^T contiguous: BLAS is far slower on the (d_out x r)^T layout for small r.
    out.addmm_(xa.narrow(1, offs[i], lora_As[i].size(0)).to(odt), lora_Bs[i].t().to(odt).contiguous());
    std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
    shape.back() = weights[i].size(0);
    outs.push_back(out.view(shape));
  }
  return {outs, xa};
}

std::tuple<at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>> lora_multi_backward(
    const LoraKernels& k, at::TensorList grad_outs, const at::Tensor& x, at::TensorList weights,
    at::TensorList lora_As, at::TensorList lora_Bs, const at::Tensor& xa, at::ArrayRef<double> scales, double p,
    int64_t seed, int64_t offset, bool need_x, bool need_A, bool need_B, const c10::List<bool>& need_bias) {
  const size_t n = weights.size();
  check_lists(n, n, lora_As.size(), lora_Bs.size(), scales.size());
  SLIMTUNE_CHECK_ARG(grad_outs.size() == n, kOp, "grad_outs", "has ", grad_outs.size(), " entries, expected ", n);
  SLIMTUNE_CHECK_ARG(need_bias.size() == n, kOp, "need_bias", "has ", need_bias.size(), " entries, expected ", n);
  for (size_t i = 0; i < n; ++i) {
    check_lora(kOp, x, weights[i], std::nullopt, lora_As[i], lora_Bs[i], scales[i], p);
  }
  const int64_t d_in = lora_As[0].size(1);
  const at::Tensor x2 = x.reshape({-1, d_in});
  const int64_t T = x2.size(0);
  const auto cdt = lora_compute_dtype(x, lora_As[0]);
  std::vector<int64_t> offs;
  const at::Tensor A = stacked_A(x, lora_As, scales, &offs);
  SLIMTUNE_CHECK_ARG(xa.dim() == 2 && xa.size(0) == T && xa.size(1) == A.size(0) && xa.scalar_type() == cdt, kOp,
                     "xa", "must be the (", T, ", ", A.size(0), ") intermediate saved by forward, got ", xa.sizes());
  const at::Tensor none = at::empty({0}, x.options());

  // gB = [g_i B_i]_i, dB_i = g_i^T xa_i (xa_i holds s_i) and the bias gradients, each g_i read
  // once per tile of rows.
  at::Tensor gB = at::empty({T, A.size(0)}, x.options().dtype(cdt));
  std::vector<at::Tensor> dBs, dbiases;
  int64_t widest = 1;
  for (size_t i = 0; i < n; ++i) {
    const int64_t d_out = lora_Bs[i].size(0);
    SLIMTUNE_CHECK_ARG(grad_outs[i].numel() == T * d_out && grad_outs[i].scalar_type() == x.scalar_type(), kOp,
                       "grad_outs", "entry ", i, " must be a (..., ", d_out, ") ", x.scalar_type(),
                       " tensor with ", T, " rows, got ", grad_outs[i].sizes(), " ", grad_outs[i].scalar_type());
    dBs.push_back(need_B ? at::zeros({lora_Bs[i].size(1), d_out}, x.options().dtype(cdt)) : none);  // dB^T
    dbiases.push_back(need_bias.get(i) ? at::zeros({d_out}, x.options().dtype(cdt)) : none);
    widest = std::max(widest, d_out);
  }
  const int64_t rows = std::min(std::max<int64_t>(1, k.tile_elems / widest), std::max<int64_t>(T, 1));
  for (size_t i = 0; i < n; ++i) {
    const int64_t d_out = lora_Bs[i].size(0), r = lora_As[i].size(0);
    const at::Tensor g2 = grad_outs[i].reshape({-1, d_out});
    const at::Tensor Bt = lora_Bs[i].t().to(cdt).contiguous();
    for (int64_t t0 = 0; t0 < T; t0 += rows) {
      const int64_t m = std::min(rows, T - t0);
      const at::Tensor gt = g2.narrow(0, t0, m).to(cdt);
      gB.narrow(0, t0, m).narrow(1, offs[i], r).copy_(at::mm(gt, Bt.t()));
      if (need_B) dBs[i].addmm_(xa.narrow(0, t0, m).narrow(1, offs[i], r).t(), gt);
      if (need_bias.get(i)) dbiases[i].add_(gt.sum(0));
    }
  }

  at::Tensor dx = none, dA = none;
  if (need_x) {
    dx = at::mm(grad_outs[0].reshape({-1, lora_Bs[0].size(0)}), weights[0]);
    for (size_t i = 1; i < n; ++i) dx.addmm_(grad_outs[i].reshape({-1, lora_Bs[i].size(0)}), weights[i]);
  }
  lora_dropout_grads(k, x2, gB, A, 1.0, p, seed, offset, need_x ? &dx : nullptr, need_A ? &dA : nullptr);
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

namespace {

std::tuple<std::vector<at::Tensor>, at::Tensor> forward_cpu(const at::Tensor& x, at::TensorList weights,
                                                            at::TensorList biases,
                                                            at::TensorList lora_As, at::TensorList lora_Bs,
                                                            at::ArrayRef<double> scales, double p, int64_t seed,
                                                            int64_t offset) {
  return lora_multi_forward(kLoraCpu, x, weights, biases, lora_As, lora_Bs, scales, p, seed, offset);
}

std::tuple<at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>> backward_cpu(
    at::TensorList grad_outs, const at::Tensor& x, at::TensorList weights, at::TensorList lora_As,
    at::TensorList lora_Bs, const at::Tensor& xa, at::ArrayRef<double> scales, double p, int64_t seed, int64_t offset,
    bool need_x, bool need_A, bool need_B, const c10::List<bool>& need_bias) {
  return lora_multi_backward(kLoraCpu, grad_outs, x, weights, lora_As, lora_Bs, xa, scales, p, seed, offset, need_x,
                             need_A, need_B, need_bias);
}

}  // namespace
}  // namespace slimtune

TORCH_LIBRARY_IMPL(slimtune, CPU, m) {
  m.impl("lora_linear_multi", &slimtune::forward_cpu);
  m.impl("lora_linear_multi_backward", &slimtune::backward_cpu);
}
