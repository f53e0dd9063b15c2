#include "cpu/sparse_delta_linear.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <vector>

namespace slimtune {
namespace cpu {
namespace {

// Dot product in the accumulation type with independent partial sums (a fixed order, so
// results are deterministic and the loop pipelines).
template <typename T>
struct Dot {
  static at::opmath_type<T> run(const T* a, const T* b, int64_t n) {
    using A = at::opmath_type<T>;
    A s0 = 0, s1 = 0, s2 = 0, s3 = 0;
    int64_t i = 0;
    for (; i + 4 <= n; i += 4) {
      s0 += static_cast<A>(a[i]) * static_cast<A>(b[i]);
      s1 += static_cast<A>(a[i + 1]) * static_cast<A>(b[i + 1]);
      s2 += static_cast<A>(a[i + 2]) * static_cast<A>(b[i + 2]);
      s3 += static_cast<A>(a[i + 3]) * static_cast<A>(b[i + 3]);
    }
    for (; i < n; ++i) s0 += static_cast<A>(a[i]) * static_cast<A>(b[i]);
    return (s0 + s1) + (s2 + s3);
  }
};

// float32: 16 independent lanes the compiler maps to SIMD registers; cloned for AVX2+FMA and
// AVX-512 with a runtime choice, since the library itself is built for the baseline ISA.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
__attribute__((target_clones("avx512f", "arch=haswell", "default")))
#endif
float dot_f32(const float* __restrict__ a, const float* __restrict__ b, int64_t n) {
  float acc[16] = {0.f};
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    for (int j = 0; j < 16; ++j) acc[j] += a[i + j] * b[i + j];
  }
  for (; i < n; ++i) acc[0] += a[i] * b[i];
  float s = 0.f;
  for (int j = 0; j < 16; ++j) s += acc[j];
  return s;
}

template <>
struct Dot<float> {
  static float run(const float* a, const float* b, int64_t n) { return dot_f32(a, b, n); }
};

template <typename I>
inline int64_t col_of(const I* idx, int64_t k, int64_t r, int64_t cols) {
  return static_cast<int64_t>(idx[k]) - r * cols;
}

}  // namespace

void sparse_delta_spmm(at::Tensor& y, const at::Tensor& x, const at::Tensor& indices, const at::Tensor& rowptr,
                       const at::Tensor& values, int64_t cols) {
  const int64_t T = x.size(0), rows = y.size(1);
  if (T == 0 || indices.numel() == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "sparse_delta_spmm_cpu", [&] {
    using X = scalar_t;
    using A = at::opmath_type<X>;
    AT_DISPATCH_INDEX_TYPES(indices.scalar_type(), "sparse_delta_spmm_cpu_index", [&] {
      const index_t* idx = indices.data_ptr<index_t>();
      const int64_t* rp = rowptr.data_ptr<int64_t>();
      const X* xp = x.data_ptr<X>();
      X* yp = y.data_ptr<X>();
      auto body = [&](auto* vp) {
        at::parallel_for(0, T, 1, [&](int64_t t0, int64_t t1) {
          for (int64_t t = t0; t < t1; ++t) {
            const X* xt = xp + t * cols;
            X* yt = yp + t * rows;
            for (int64_t r = 0; r < rows; ++r) {
              if (rp[r] == rp[r + 1]) continue;
              A acc = 0;
              for (int64_t k = rp[r]; k < rp[r + 1]; ++k) {
                acc += static_cast<A>(vp[k]) * static_cast<A>(xt[col_of(idx, k, r, cols)]);
              }
              yt[r] = static_cast<X>(static_cast<A>(yt[r]) + acc);
            }
          }
        });
      };
      if (values.scalar_type() == x.scalar_type()) body(values.data_ptr<X>()); else body(values.data_ptr<float>());
    });
  });
}

void sparse_delta_spmm_t(at::Tensor& dx, const at::Tensor& g, const at::Tensor& indices, const at::Tensor& rowptr,
                         const at::Tensor& values, int64_t cols) {
  const int64_t T = g.size(0), rows = g.size(1);
  if (T == 0 || indices.numel() == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "sparse_delta_spmm_t_cpu", [&] {
    using X = scalar_t;
    using A = at::opmath_type<X>;
    AT_DISPATCH_INDEX_TYPES(indices.scalar_type(), "sparse_delta_spmm_t_cpu_index", [&] {
      const index_t* idx = indices.data_ptr<index_t>();
      const int64_t* rp = rowptr.data_ptr<int64_t>();
      const X* gp = g.data_ptr<X>();
      X* dxp = dx.data_ptr<X>();
      auto body = [&](auto* vp) {
        at::parallel_for(0, T, 1, [&](int64_t t0, int64_t t1) {
          // One accumulation row per chunk: each dx element is rounded once, not once per add.
          std::vector<A> acc(cols);
          for (int64_t t = t0; t < t1; ++t) {
            std::fill(acc.begin(), acc.end(), A(0));
            const X* gt = gp + t * rows;
            for (int64_t r = 0; r < rows; ++r) {
              const A gv = static_cast<A>(gt[r]);
              for (int64_t k = rp[r]; k < rp[r + 1]; ++k) acc[col_of(idx, k, r, cols)] += gv * static_cast<A>(vp[k]);
            }
            X* dxt = dxp + t * cols;
            for (int64_t c = 0; c < cols; ++c) dxt[c] = static_cast<X>(static_cast<A>(dxt[c]) + acc[c]);
          }
        });
      };
      if (values.scalar_type() == g.scalar_type()) body(values.data_ptr<X>()); else body(values.data_ptr<float>());
    });
  });
}

at::Tensor sparse_delta_sddmm(const at::Tensor& a, const at::Tensor& b, const at::Tensor& indices,
                              const at::Tensor& rowptr, int64_t cols) {
  const int64_t T = a.size(0), rows = a.size(1), K = indices.numel();
  const auto acc_type = a.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor out = at::zeros({K}, a.options().dtype(acc_type));
  if (T == 0 || K == 0) return out;
  // Token-major operands make every d v_k a strided gather. Per tile of tokens, a transposed
  // copy of the tile of each operand (d × tile, sized to stay in cache) makes every d v_k a
  // contiguous dot, and a row of aᵀ is reused by every entry of that row. Tiles are summed
  // in a fixed order, so the result is deterministic.
  constexpr int64_t kTile = 128;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "sparse_delta_sddmm_cpu", [&] {
    using X = scalar_t;
    using A = at::opmath_type<X>;
    AT_DISPATCH_INDEX_TYPES(indices.scalar_type(), "sparse_delta_sddmm_cpu_index", [&] {
      const index_t* idx = indices.data_ptr<index_t>();
      const int64_t* rp = rowptr.data_ptr<int64_t>();
      A* op = out.data_ptr<A>();
      for (int64_t t0 = 0; t0 < T; t0 += kTile) {
        const int64_t tb = std::min(kTile, T - t0);
        const at::Tensor aT = a.narrow(0, t0, tb).t().contiguous();
        const at::Tensor bT = b.narrow(0, t0, tb).t().contiguous();
        const X* ap = aT.data_ptr<X>();
        const X* bp = bT.data_ptr<X>();
        at::parallel_for(0, rows, 8, [&](int64_t r0, int64_t r1) {
          for (int64_t r = r0; r < r1; ++r) {
            const X* ar = ap + r * tb;
            for (int64_t k = rp[r]; k < rp[r + 1]; ++k) op[k] += Dot<X>::run(ar, bp + col_of(idx, k, r, cols) * tb, tb);
          }
        });
      }
    });
  });
  return out;
}

}  // namespace cpu
}  // namespace slimtune
