// CPU kernels of the memsave family (at::parallel_for over raw pointers).
#include <ATen/Parallel.h>

#include <cstdint>
#include <type_traits>
#include <vector>

#include "common/acc.h"
#include "common/cpu_dispatch.h"
#include "memsave/memsave.h"

namespace slimtune {
namespace memsave {
namespace {

// Unsigned integer of a float type's width: selecting by AND-ing with all-ones / all-zeros
// keeps the loops branch-free (and vectorizable) and passes NaN payloads through unchanged.
template <typename T>
using Bits = std::conditional_t<sizeof(T) == 8, uint64_t, std::conditional_t<sizeof(T) == 4, uint32_t, uint16_t>>;

template <typename T>
inline bool passes(T v) {
  // NaN passes (and keeps its gradient), as in torch.relu / threshold_backward.
  return !(static_cast<acc_t<T>>(v) <= 0);
}

// The output keeps every input that is not below zero: -0.0 stays -0.0 and NaN stays NaN, as
// torch.relu gives; only the gradient mask (passes) drops -0.0.
template <typename T>
inline bool kept(T v) {
  return !(static_cast<acc_t<T>>(v) < 0);
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
        if (out != nullptr) out[base + j] = xb[base + j] & static_cast<Bits<T>>(-static_cast<Bits<T>>(kept(x[base + j])));
      }
    } else {
      for (int64_t j = 0; base + j < n; ++j) {
        const bool keep = passes(x[base + j]);
        byte |= static_cast<uint8_t>(keep) << j;
        if (out != nullptr) out[base + j] = xb[base + j] & static_cast<Bits<T>>(-static_cast<Bits<T>>(kept(x[base + j])));
      }
    }
    m[b] = byte;
  }
}

}  // namespace

Status relu_cpu(const ReluParams& p, void*) {
  if (p.n == 0) return kSuccess;
  return dispatch_cpu_float(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    const T* x = static_cast<const T*>(p.x);
    Bits<T>* o = static_cast<Bits<T>*>(p.out);
    uint8_t* m = p.mask;
    const int64_t n = p.n;
    // Chunks of whole bytes: no two tasks write the same mask byte.
    at::parallel_for(0, (n + 7) / 8, 2048, [&](int64_t begin, int64_t end) { relu_bytes(x, o, m, n, begin, end); });
    return kSuccess;
  });
}

Status relu_backward_cpu(const ReluBackwardParams& p, void*) {
  const int64_t n = p.n;
  if (n == 0) return kSuccess;
  const uint8_t* m = p.mask;
  return dispatch_cpu_float(p.dtype, [&](auto tag) {
    using U = Bits<decltype(tag)>;
    const U* g = static_cast<const U*>(p.grad);
    U* out = static_cast<U*>(p.grad_in);
    at::parallel_for(0, (n + 7) / 8, 2048, [&](int64_t begin, int64_t end) {
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
    return kSuccess;
  });
}

namespace {

// Visits the outputs of planes [begin, end) in storage order: f(plane, i, st0, st1, o2) with i the
// flat output index, st0 and st1 the (padded) window start in dims 0 and 1, o2 the dim-2 position.
template <typename F>
void for_each_output(const PoolGeometry& g, int64_t begin, int64_t end, F&& f) {
  const int64_t per_plane = g.out[0] * g.out[1] * g.out[2];
  for (int64_t pl = begin; pl < end; ++pl) {
    int64_t i = pl * per_plane;
    for (int64_t o0 = 0; o0 < g.out[0]; ++o0) {
      const int64_t st0 = o0 * g.stride[0] - g.padding[0];
      for (int64_t o1 = 0; o1 < g.out[1]; ++o1) {
        const int64_t st1 = o1 * g.stride[1] - g.padding[1];
        for (int64_t o2 = 0; o2 < g.out[2]; ++o2, ++i) f(pl, i, st0, st1, o2);
      }
    }
  }
}

}  // namespace

Status maxpool_compact_cpu(const MaxpoolCompactParams& p, void*) {
  const PoolGeometry& g = p.g;
  const int64_t* idx = p.indices;
  signed char* off = p.offsets;
  // Integer divisions dominate this loop: one per spatial dim beyond the first, and none
  // for the common dilation of 1.
  auto step = [](int64_t c, int64_t start, int64_t dil) { return dil == 1 ? c - start : (c - start) / dil; };
  at::parallel_for(0, g.planes, 1, [&](int64_t begin, int64_t end) {
    for_each_output(g, begin, end, [&](int64_t, int64_t i, int64_t st0, int64_t st1, int64_t o2) {
      const int64_t st2 = o2 * g.stride[2] - g.padding[2];
      const int64_t flat = idx[i];
      const int64_t rows = g.in[2] == 1 ? flat : flat / g.in[2];
      const int64_t c2 = flat - rows * g.in[2];
      const int64_t c0 = g.in[0] == 1 ? 0 : rows / g.in[1];
      const int64_t c1 = rows - c0 * g.in[1];
      const int64_t w = (step(c0, st0, g.dilation[0]) * g.kernel[1] + step(c1, st1, g.dilation[1])) * g.kernel[2] +
                        step(c2, st2, g.dilation[2]);
      off[i] = static_cast<signed char>(w);
    });
  });
  return kSuccess;
}

Status maxpool_backward_cpu(const MaxpoolBackwardParams& p, void*) {
  const PoolGeometry& g = p.g;
  const int64_t in_plane = g.in[0] * g.in[1] * g.in[2];
  const signed char* off = p.offsets;
  // Window offset -> displacement from the window's (virtual, possibly padded) corner in the
  // flat input plane: at most 127 entries, so the loop below does no division.
  const int64_t window = g.kernel[0] * g.kernel[1] * g.kernel[2];
  std::vector<int64_t> disp(static_cast<size_t>(window));
  for (int64_t w = 0; w < window; ++w) {
    const int64_t s2 = w % g.kernel[2];
    const int64_t s1 = (w / g.kernel[2]) % g.kernel[1];
    const int64_t s0 = w / (g.kernel[2] * g.kernel[1]);
    disp[static_cast<size_t>(w)] = (s0 * g.dilation[0] * g.in[1] + s1 * g.dilation[1]) * g.in[2] + s2 * g.dilation[2];
  }
  return dispatch_cpu_float(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    using A = acc_t<T>;
    const T* gr = static_cast<const T*>(p.grad);
    A* out = static_cast<A*>(p.grad_in);
    // One plane per task: overlapping windows of a plane accumulate in order, no races.
    at::parallel_for(0, g.planes, 1, [&](int64_t begin, int64_t end) {
      for_each_output(g, begin, end, [&](int64_t pl, int64_t i, int64_t st0, int64_t st1, int64_t o2) {
        const int64_t corner = (st0 * g.in[1] + st1) * g.in[2] + o2 * g.stride[2] - g.padding[2];
        out[pl * in_plane + corner + disp[static_cast<size_t>(off[i])]] += static_cast<A>(gr[i]);
      });
    });
    return kSuccess;
  });
}

}  // namespace memsave
}  // namespace slimtune
