#include <c10/core/DeviceGuard.h>
#include <torch/library.h>

#include "cuda/lora_dropout.h"
#include "cuda/philox.h"
#include "ops/common.h"
#include "ops/cuda_stream.h"
#include "ops/lora.h"

namespace slimtune {
namespace {

void dropout_scale_cuda(const at::Tensor& x, int64_t e_base, double mult, uint32_t thresh, uint64_t seed,
                        uint64_t offset, at::Tensor& out) {
  check_cuda_status(cuda::lora_dropout_scale(x.data_ptr(), to_kernel_dtype(x.scalar_type()), x.stride(0), x.stride(1),
                                             x.size(0), x.size(1), e_base, mult, thresh, seed, offset, out.data_ptr(),
                                             to_kernel_dtype(out.scalar_type()), current_cuda_stream(x.device())),
                    "lora_linear");
}

void masked_add_cuda(at::Tensor& dx, const at::Tensor& tmp, int64_t e_base, double mult, uint32_t thresh,
                     uint64_t seed, uint64_t offset, bool accumulate) {
  check_cuda_status(cuda::lora_masked_add(dx.data_ptr(), to_kernel_dtype(dx.scalar_type()), tmp.data_ptr(),
                                          to_kernel_dtype(tmp.scalar_type()), dx.size(0), dx.size(1), e_base, mult,
                                          thresh, seed, offset, accumulate, current_cuda_stream(dx.device())),
                    "lora_linear_backward");
}

void backward_tile_cuda(const at::Tensor& x, const at::Tensor& tmp, at::Tensor& dx, int64_t e_base, double mult,
                        uint32_t thresh, uint64_t seed, uint64_t offset, at::Tensor& xd) {
  check_cuda_status(cuda::lora_dropout_backward_tile(x.data_ptr(), to_kernel_dtype(x.scalar_type()), x.stride(0),
                                                     x.stride(1), x.size(0), x.size(1), tmp.data_ptr(),
                                                     to_kernel_dtype(tmp.scalar_type()), dx.data_ptr(), xd.data_ptr(),
                                                     e_base, mult, thresh, seed, offset,
                                                     current_cuda_stream(x.device())),
                    "lora_linear_backward");
}

// Large tiles: on a GPU the scratch is cheap and each tile costs kernel launches.
const LoraKernels kCuda{&dropout_scale_cuda, &masked_add_cuda, &backward_tile_cuda, int64_t{1} << 24};

std::tuple<at::Tensor, at::Tensor> forward_cuda(const at::Tensor& x, const std::optional<at::Tensor>& weight,
                                                const std::optional<at::Tensor>& bias, const at::Tensor& lora_A,
                                                const at::Tensor& lora_B, double scale, double p, int64_t seed,
                                                int64_t offset) {
  c10::DeviceGuard guard(x.device());
  return lora_forward(kCuda, x, weight, bias, lora_A, lora_B, scale, p, seed, offset);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& x, const std::optional<at::Tensor>& weight,
    const at::Tensor& lora_A, const at::Tensor& lora_B, const at::Tensor& xa, double scale, double p, int64_t seed,
    int64_t offset, bool need_x, bool need_A, bool need_B, bool need_bias) {
  c10::DeviceGuard guard(x.device());
  return lora_backward(kCuda, grad_out, x, weight, lora_A, lora_B, xa, scale, p, seed, offset, need_x, need_A, need_B,
                       need_bias);
}

std::tuple<std::vector<at::Tensor>, at::Tensor> multi_forward_cuda(
    const at::Tensor& x, at::TensorList weights, at::TensorList biases,
    at::TensorList lora_As, at::TensorList lora_Bs, at::ArrayRef<double> scales, double p, int64_t seed,
    int64_t offset) {
  c10::DeviceGuard guard(x.device());
  return lora_multi_forward(kCuda, x, weights, biases, lora_As, lora_Bs, scales, p, seed, offset);
}

std::tuple<at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>> multi_backward_cuda(
    at::TensorList grad_outs, const at::Tensor& x, at::TensorList weights, at::TensorList lora_As,
    at::TensorList lora_Bs, const at::Tensor& xa, at::ArrayRef<double> scales, double p, int64_t seed, int64_t offset,
    bool need_x, bool need_A, bool need_B, const c10::List<bool>& need_bias) {
  c10::DeviceGuard guard(x.device());
  return lora_multi_backward(kCuda, grad_outs, x, weights, lora_As, lora_Bs, xa, scales, p, seed, offset, need_x,
                             need_A, need_B, need_bias);
}

at::Tensor mask_cuda(const at::Tensor& like, double p, int64_t seed, int64_t offset) {
  SLIMTUNE_CHECK_ARG(p >= 0.0 && p < 1.0, "lora_dropout_mask", "p", "must be in [0, 1), got ", p);
  c10::DeviceGuard guard(like.device());
  at::Tensor out = at::empty(like.sizes(), like.options().dtype(at::kBool));
  check_cuda_status(cuda::lora_dropout_mask(out.data_ptr<bool>(), out.numel(), p > 0.0 ? philox::threshold(p) : 0u,
                                            static_cast<uint64_t>(seed), static_cast<uint64_t>(offset),
                                            current_cuda_stream(like.device())),
                    "lora_dropout_mask");
  return out;
}

}  // namespace
}  // namespace slimtune

TORCH_LIBRARY_IMPL(slimtune, CUDA, m) {
  m.impl("lora_linear", &slimtune::forward_cuda);
  m.impl("lora_linear_backward", &slimtune::backward_cuda);
  m.impl("lora_dropout_mask", &slimtune::mask_cuda);
  m.impl("lora_linear_multi", &slimtune::multi_forward_cuda);
  m.impl("lora_linear_multi_backward", &slimtune::multi_backward_cuda);
}
