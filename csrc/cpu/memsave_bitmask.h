#pragma once
#include <ATen/ATen.h>

namespace slimtune {
namespace cpu {

// mask bit i (byte i/8, bit i%8) = !(x[i] <= 0), i.e. where ReLU lets the gradient through
// (NaN included, as threshold_backward does). x contiguous; mask uint8 of ceil(n/8) bytes.
void memsave_relu_mask(const at::Tensor& x, at::Tensor& mask);

// out = relu(x) and the mask above in one pass (out may alias x).
void memsave_relu_forward(const at::Tensor& x, at::Tensor& out, at::Tensor& mask);

// grad_in[i] = bit i of mask ? grad[i] : 0, on contiguous grad / grad_in of one dtype.
void memsave_relu_backward(const at::Tensor& grad, const at::Tensor& mask, at::Tensor& grad_in);

}  // namespace cpu
}  // namespace slimtune
