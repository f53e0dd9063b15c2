// Fused LoRA linear: y = x W0^T (+ b) + s (dropout(x) A^T) B^T. The GEMMs are ATen's; the
// dropout is a Philox mask regenerated from (seed, offset) by per-device elementwise kernels,
// applied tile by tile so neither a dropped copy of x nor a mask is ever stored.
#pragma once
#include <ATen/ATen.h>

#include <cstdint>
#include <optional>
#include <tuple>

namespace slimtune {

// The per-device pieces; the driver in ops/lora.cpp is shared by CPU and CUDA.
struct LoraKernels {
  // out = keep ? x * mult : 0 (see cpu/lora_dropout.h for the element numbering).
  void (*dropout_scale)(const at::Tensor& x, int64_t e_base, double mult, uint32_t thresh, uint64_t seed,
                        uint64_t offset, at::Tensor& out);
  // dx (+)= keep ? tmp * mult : 0.
  void (*masked_add)(at::Tensor& dx, const at::Tensor& tmp, int64_t e_base, double mult, uint32_t thresh,
                     uint64_t seed, uint64_t offset, bool accumulate);
  // Both backward terms from one mask: dx += keep ? tmp * mult : 0, xd = keep ? x * mult : 0.
  void (*backward_tile)(const at::Tensor& x, const at::Tensor& tmp, at::Tensor& dx, int64_t e_base, double mult,
                        uint32_t thresh, uint64_t seed, uint64_t offset, at::Tensor& xd);
  // Elements per tile of rows: the scratch a tile needs (a few MiB on a CPU cache, more on a GPU).
  int64_t tile_elems;
};

// The accumulation dtype: float64 when x or the adapters are float64 (float32 adapters over a
// float64 x must not round x, g B A or dx to float32), float32 otherwise.
inline at::ScalarType lora_compute_dtype(const at::Tensor& x, const at::Tensor& lora_A) {
  return x.scalar_type() == at::kDouble || lora_A.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// xa = scale * dropout(x2) A^T (T x r, compute dtype), one pass over x2 (T x d_in).
at::Tensor lora_down(const LoraKernels& k, const at::Tensor& x2, const at::Tensor& lora_A, double scale, double p,
                     int64_t seed, int64_t offset);

// *dx += scale * (gB A) * mask / (1 - p) and *dA = scale * gB^T (x2 * mask / (1 - p)) (compute
// dtype), the mask regenerated from (seed, offset); either pointer may be null.
void lora_dropout_grads(const LoraKernels& k, const at::Tensor& x2, const at::Tensor& gB, const at::Tensor& lora_A,
                        double scale, double p, int64_t seed, int64_t offset, at::Tensor* dx, at::Tensor* dA);

void check_lora(const char* op, const at::Tensor& x, const std::optional<at::Tensor>& weight,
                const std::optional<at::Tensor>& bias, const at::Tensor& lora_A, const at::Tensor& lora_B, double scale,
                double p);

std::tuple<at::Tensor, at::Tensor> lora_forward(const LoraKernels& k, const at::Tensor& x,
                                                const std::optional<at::Tensor>& weight,
                                                const std::optional<at::Tensor>& bias, const at::Tensor& lora_A,
                                                const at::Tensor& lora_B, double scale, double p, int64_t seed,
                                                int64_t offset);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> lora_backward(
    const LoraKernels& k, const at::Tensor& grad_out, const at::Tensor& x, const std::optional<at::Tensor>& weight,
    const at::Tensor& lora_A, const at::Tensor& lora_B, const at::Tensor& xa, double scale, double p, int64_t seed,
    int64_t offset, bool need_x, bool need_A, bool need_B, bool need_bias);

// Several adapted projections of one x (Q/K/V, gate/up): out_i = x W_i^T (+ b_i) +
// s_i (dropout(x) A_i^T) B_i^T with ONE dropout mask, x read once for all the A_i.
// An empty entry of `biases` means no bias. Returns the outputs and xa = [s_i dropout(x) A_i^T]_i (T x sum r_i).
std::tuple<std::vector<at::Tensor>, at::Tensor> lora_multi_forward(
    const LoraKernels& k, const at::Tensor& x, at::TensorList weights, at::TensorList biases,
    at::TensorList lora_As, at::TensorList lora_Bs, at::ArrayRef<double> scales, double p, int64_t seed,
    int64_t offset);

std::tuple<at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>> lora_multi_backward(
    const LoraKernels& k, at::TensorList grad_outs, const at::Tensor& x, at::TensorList weights,
    at::TensorList lora_As, at::TensorList lora_Bs, const at::Tensor& xa, at::ArrayRef<double> scales, double p,
    int64_t seed, int64_t offset, bool need_x, bool need_A, bool need_B, const c10::List<bool>& need_bias);

// The CPU kernels (the CUDA glue has its own).
extern const LoraKernels kLoraCpu;

}  // namespace slimtune
