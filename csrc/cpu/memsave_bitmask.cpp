#include "cpu/memsave_bitmask.h"

#include <cstdint>
#include <type_traits>

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

namespace slimtune {
namespace cpu {
namespace {

// Unsigned integer of a float type's width: selecting by AND-ing with all-ones / all-zeros
// keeps the loops branch-free (and vectorizable) and passes NaN payloads through unchanged.
template <typename T>
using Bits = std::conditional_t<sizeof(T) == 8, uint64_t, std::conditional_t<sizeof(T) == 4, uint32_t, uint16_t>>;

template <typename T>
inline bool passes(T v) {
  // NaN passes (and keeps its gradient), as in torch.relu / threshold_backward.
  return !(static_cast<at::opmath_type<T>>(v) <= 0);
}

// Bytes [begin, end) of the mask over n elements; `out` (may alias x) gets relu(x) when given.
template <typename T>
void relu_bytes(const T* x, Bits<T>* out, uint8_t* m, int64_t n, int64_t begin, int64_t end) {
  const Bits<T>* xb = reinterpret_cast<const Bits<T>*>(x);
  for (int64_t b = begin; b < end; ++b) {
    const int64_t base = b * 8;
    uint8_t byte = 0;
    if (base + 8 <= n) {
      for (int j = 0; j < 8; ++j) {
        const bool keep = passes(x[base + j]);
        byte |= static_cast<uint8_t>(keep) << j;
        if (out != nullptr) out[base + j] = xb[base + j] & static_cast<Bits<T>>(-static_cast<Bits<T>>(keep));
      }
    } else {
      for (int64_t j = 0; base + j < n; ++j) {
        const bool keep = passes(x[base + j]);
        byte |= static_cast<uint8_t>(keep) << j;
        if (out != nullptr) out[base + j] = xb[base + j] & static_cast<Bits<T>>(-static_cast<Bits<T>>(keep));
      }
    }
    m[b] = byte;
  }
}

template <typename T>
void relu_mask_impl(const at::Tensor& x, at::Tensor* out, at::Tensor& mask) {
  const int64_t n = x.numel();
  const T* p = x.const_data_ptr<T>();
  Bits<T>* o = out == nullptr ? nullptr : reinterpret_cast<Bits<T>*>(out->data_ptr<T>());
  uint8_t* m = mask.data_ptr<uint8_t>();
  // Chunks of whole bytes: no two tasks write the same mask byte.
  at::parallel_for(0, mask.numel(), 2048, [&](int64_t begin, int64_t end) { relu_bytes(p, o, m, n, begin, end); });
}

}  // namespace

void memsave_relu_mask(const at::Tensor& x, at::Tensor& mask) {
  if (x.numel() == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "memsave_relu_mask_cpu",
                                  [&] { relu_mask_impl<scalar_t>(x, nullptr, mask); });
}

void memsave_relu_forward(const at::Tensor& x, at::Tensor& out, at::Tensor& mask) {
  if (x.numel() == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "memsave_relu_forward_cpu",
                                  [&] { relu_mask_impl<scalar_t>(x, &out, mask); });
}

void memsave_relu_backward(const at::Tensor& grad, const at::Tensor& mask, at::Tensor& grad_in) {
  const int64_t n = grad.numel();
  if (n == 0) return;
  const uint8_t* m = mask.const_data_ptr<uint8_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "memsave_relu_backward_cpu", [&] {
    using U = Bits<scalar_t>;
    const U* g = reinterpret_cast<const U*>(grad.const_data_ptr<scalar_t>());
    U* out = reinterpret_cast<U*>(grad_in.data_ptr<scalar_t>());
    at::parallel_for(0, mask.numel(), 2048, [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        const int64_t base = b * 8;
        const unsigned byte = m[b];
        if (base + 8 <= n) {
          for (int j = 0; j < 8; ++j) {
            out[base + j] = g[base + j] & static_cast<U>(-static_cast<U>((byte >> j) & 1u));
          }
        } else {
          for (int64_t j = 0; base + j < n; ++j) {
            out[base + j] = g[base + j] & static_cast<U>(-static_cast<U>((byte >> j) & 1u));
          }
        }
      }
    });
  });
}

}  // namespace cpu
}  // namespace slimtune
