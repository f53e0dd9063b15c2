#pragma once
#include "cuda/types.h"

namespace slimtune {
namespace cuda {

// mask (ceil(n/8) bytes): bit i = !(x[i] <= 0). x contiguous with n elements.
Status memsave_relu_mask(const void* x, DType dtype, int64_t n, unsigned char* mask, void* stream);

// out = relu(x) (contiguous, may alias x) and the mask above in one pass.
Status memsave_relu_forward(const void* x, DType dtype, int64_t n, void* out, unsigned char* mask, void* stream);

// grad_in[i] = bit i of mask ? grad[i] : 0; grad and grad_in contiguous, n elements of `dtype`.
Status memsave_relu_backward(const void* grad, DType dtype, int64_t n, const unsigned char* mask, void* grad_in,
                             void* stream);

}  // namespace cuda
}  // namespace slimtune
