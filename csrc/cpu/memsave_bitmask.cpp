#include "cpu/memsave_bitmask.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

namespace slimtune {
namespace cpu {

void memsave_relu_mask(const at::Tensor& x, at::Tensor& mask) {
  const int64_t n = x.numel();
  const int64_t nbytes = mask.numel();
  if (n == 0) return;
  uint8_t* m = mask.data_ptr<uint8_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "memsave_relu_mask_cpu", [&] {
    const scalar_t* p = x.const_data_ptr<scalar_t>();
    // One byte per task item: chunks never share a byte, so no synchronisation is needed.
    at::parallel_for(0, nbytes, 4096, [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        const int64_t base = b * 8;
        const int64_t lim = std::min<int64_t>(8, n - base);
        uint8_t byte = 0;
        for (int64_t j = 0; j < lim; ++j) {
          byte |= static_cast<uint8_t>(!(static_cast<at::opmath_type<scalar_t>>(p[base + j]) <= 0)) << j;
        }
        m[b] = byte;
      }
    });
  });
}

void memsave_relu_backward(const at::Tensor& grad, const at::Tensor& mask, at::Tensor& grad_in) {
  const int64_t n = grad.numel();
  if (n == 0) return;
  const uint8_t* m = mask.const_data_ptr<uint8_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "memsave_relu_backward_cpu", [&] {
    const scalar_t* g = grad.const_data_ptr<scalar_t>();
    scalar_t* out = grad_in.data_ptr<scalar_t>();
    const scalar_t zero = static_cast<scalar_t>(0);
    at::parallel_for(0, n, 32768, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        out[i] = ((m[i >> 3] >> (i & 7)) & 1) ? g[i] : zero;
      }
    });
  });
}

}  // namespace cpu
}  // namespace slimtune
