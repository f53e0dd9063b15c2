#pragma once
#include <ATen/ATen.h>

namespace slimtune {

void check_memsave_relu_mask(const at::Tensor& x);
void check_memsave_relu_backward(const at::Tensor& grad, const at::Tensor& mask);

inline int64_t memsave_mask_bytes(int64_t numel) { return (numel + 7) / 8; }

}  // namespace slimtune
