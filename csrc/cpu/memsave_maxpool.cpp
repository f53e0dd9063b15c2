#include "cpu/memsave_maxpool.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <vector>

namespace slimtune {
namespace cpu {

void memsave_maxpool_compact(const at::Tensor& indices, at::Tensor& offsets, const cuda::PoolGeometry& g) {
  const int64_t per_plane = g.out[0] * g.out[1] * g.out[2];
  const int64_t* idx = indices.const_data_ptr<int64_t>();
  int8_t* off = offsets.data_ptr<int8_t>();
  // Integer divisions dominate this loop: one per spatial dim beyond the first, and none
  // for the common dilation of 1.
  auto step = [](int64_t c, int64_t start, int64_t dil) { return dil == 1 ? c - start : (c - start) / dil; };
  at::parallel_for(0, g.planes, 1, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      int64_t i = p * per_plane;
      for (int64_t o0 = 0; o0 < g.out[0]; ++o0) {
        const int64_t st0 = o0 * g.stride[0] - g.padding[0];
        for (int64_t o1 = 0; o1 < g.out[1]; ++o1) {
          const int64_t st1 = o1 * g.stride[1] - g.padding[1];
          for (int64_t o2 = 0; o2 < g.out[2]; ++o2, ++i) {
            const int64_t st2 = o2 * g.stride[2] - g.padding[2];
            const int64_t flat = idx[i];
            const int64_t rows = g.in[2] == 1 ? flat : flat / g.in[2];
            const int64_t c2 = flat - rows * g.in[2];
            const int64_t c0 = g.in[0] == 1 ? 0 : rows / g.in[1];
            const int64_t c1 = rows - c0 * g.in[1];
            const int64_t w = (step(c0, st0, g.dilation[0]) * g.kernel[1] + step(c1, st1, g.dilation[1])) *
                                  g.kernel[2] + step(c2, st2, g.dilation[2]);
            off[i] = static_cast<int8_t>(w);
          }
        }
      }
    }
  });
}

void memsave_maxpool_backward(const at::Tensor& grad, const at::Tensor& offsets, at::Tensor& grad_in,
                              const cuda::PoolGeometry& g) {
  const int64_t per_plane = g.out[0] * g.out[1] * g.out[2];
  const int64_t in_plane = g.in[0] * g.in[1] * g.in[2];
  const int8_t* off = offsets.const_data_ptr<int8_t>();
  // Window offset -> displacement from the window's (virtual, possibly padded) corner in the
  // flat input plane: at most 127 entries, so the loop below does no division.
  const int64_t window = g.kernel[0] * g.kernel[1] * g.kernel[2];
  std::vector<int64_t> disp(static_cast<size_t>(window));
  for (int64_t w = 0; w < window; ++w) {
    const int64_t s2 = w % g.kernel[2];
    const int64_t s1 = (w / g.kernel[2]) % g.kernel[1];
    const int64_t s0 = w / (g.kernel[2] * g.kernel[1]);
    disp[static_cast<size_t>(w)] =
        (s0 * g.dilation[0] * g.in[1] + s1 * g.dilation[1]) * g.in[2] + s2 * g.dilation[2];
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "memsave_maxpool_backward_cpu", [&] {
    using A = at::opmath_type<scalar_t>;
    const scalar_t* gr = grad.const_data_ptr<scalar_t>();
    A* out = grad_in.data_ptr<A>();
    // One plane per task: overlapping windows of a plane accumulate in order, no races.
    at::parallel_for(0, g.planes, 1, [&](int64_t begin, int64_t end) {
      for (int64_t p = begin; p < end; ++p) {
        A* plane = out + p * in_plane;
        int64_t i = p * per_plane;
        for (int64_t o0 = 0; o0 < g.out[0]; ++o0) {
          const int64_t st0 = o0 * g.stride[0] - g.padding[0];
          for (int64_t o1 = 0; o1 < g.out[1]; ++o1) {
            const int64_t st1 = o1 * g.stride[1] - g.padding[1];
            for (int64_t o2 = 0; o2 < g.out[2]; ++o2, ++i) {
              const int64_t corner = (st0 * g.in[1] + st1) * g.in[2] + o2 * g.stride[2] - g.padding[2];
              plane[corner + disp[static_cast<size_t>(off[i])]] += static_cast<A>(gr[i]);
            }
          }
        }
      }
    });
  });
}

}  // namespace cpu
}  // namespace slimtune
