// CPU kernels of the sparse-delta family (at::parallel_for over raw pointers).
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "common/acc.h"
#include "common/cpu_dispatch.h"
#include "sparse_delta/sparse_delta.h"

namespace slimtune {
namespace sparse_delta {
namespace {

// Dot product in the accumulation type with independent partial sums (a fixed order, so
// results are deterministic and the loop pipelines).
template <typename T>
struct Dot {
  static acc_t<T> run(const T* a, const T* b, int64_t n) {
    using A = acc_t<T>;
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

// dst (n × m) = srcᵀ for src (m × n), both contiguous.
template <typename X>
void transpose(const X* src, int64_t m, int64_t n, X* dst) {
  for (int64_t i = 0; i < m; ++i) {
    for (int64_t j = 0; j < n; ++j) dst[j * m + i] = src[i * n + j];
  }
}

// Calls f(X{}, indices, values) with the dense type of an SpMM and its typed CSR arrays; nothing to
// add (no tokens or an empty delta) does nothing.
template <typename F>
Status dispatch_spmm(const SpmmOperands& p, F&& f) {
  if (p.T == 0 || p.rowptr[p.rows] == 0) return kSuccess;
  return dispatch_cpu_float(p.dtype, [&](auto x_tag) {
    using X = decltype(x_tag);
    return dispatch_cpu_index(p.index_type, [&](auto i_tag) {
      using I = decltype(i_tag);
      return dispatch_values<X>(p.value_dtype, p.dtype, [&](auto v_tag) {
        using V = decltype(v_tag);
        f(x_tag, static_cast<const I*>(p.indices), static_cast<const V*>(p.values));
        return kSuccess;
      });
    });
  });
}

}  // namespace

Status merge_cpu(const MergeParams& p, void*) {
  if (p.n == 0) return kSuccess;
  return dispatch_cpu_float(p.weight_dtype, [&](auto w_tag) {
    using W = decltype(w_tag);
    using A = acc_t<W>;
    return dispatch_cpu_index(p.index_type, [&](auto i_tag) {
      using I = decltype(i_tag);
      return dispatch_values<W>(p.value_dtype, p.weight_dtype, [&](auto v_tag) {
        using V = decltype(v_tag);
        W* weight = static_cast<W*>(p.weight);
        const I* indices = static_cast<const I*>(p.indices);
        const V* values = static_cast<const V*>(p.values);
        const A a = static_cast<A>(p.alpha);
        // Indices are unique, so chunks never write the same element.
        at::parallel_for(0, p.n, 16384, [&](int64_t begin, int64_t end) {
          for (int64_t k = begin; k < end; ++k) {
            W& w = weight[indices[k]];
            w = static_cast<W>(static_cast<A>(w) + a * static_cast<A>(values[k]));
          }
        });
        return kSuccess;
      });
    });
  });
}

Status spmm_cpu(const SpmmParams& p, void*) {
  const int64_t T = p.T, rows = p.rows, cols = p.cols;
  return dispatch_spmm(p, [&](auto x_tag, auto idx, auto vp) {
    using X = decltype(x_tag);
    using A = acc_t<X>;
    const int64_t* rp = p.rowptr;
    const X* xp = static_cast<const X*>(p.x);
    X* yp = static_cast<X*>(p.y);
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
  });
}

Status spmm_t_cpu(const SpmmTParams& p, void*) {
  const int64_t T = p.T, rows = p.rows, cols = p.cols;
  return dispatch_spmm(p, [&](auto x_tag, auto idx, auto vp) {
    using X = decltype(x_tag);
    using A = acc_t<X>;
    const int64_t* rp = p.rowptr;
    const X* gp = static_cast<const X*>(p.g);
    X* dxp = static_cast<X*>(p.dx);
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
  });
}

Status sddmm_cpu(const SddmmParams& p, void*) {
  const int64_t T = p.T, rows = p.rows, cols = p.cols, K = p.K;
  return dispatch_cpu_float(p.dtype, [&](auto x_tag) {
    using X = decltype(x_tag);
    using A = acc_t<X>;
    A* op = static_cast<A*>(p.out);
    std::fill(op, op + K, A(0));
    if (T == 0 || K == 0) return kSuccess;
    return dispatch_cpu_index(p.index_type, [&](auto i_tag) {
      using I = decltype(i_tag);
      const I* idx = static_cast<const I*>(p.indices);
      const int64_t* rp = p.rowptr;
      const X* a = static_cast<const X*>(p.a);
      const X* b = static_cast<const X*>(p.b);
      // Token-major operands make every d v_k a strided gather. Per tile of tokens, a transposed
      // copy of the tile of each operand (d × tile, sized to stay in cache) makes every d v_k a
      // contiguous dot, and a row of aᵀ is reused by every entry of that row. Tiles are summed
      // in a fixed order, so the result is deterministic.
      constexpr int64_t kTile = 128;
      std::vector<X> aT(static_cast<size_t>(rows * std::min(kTile, T)));
      std::vector<X> bT(static_cast<size_t>(cols * std::min(kTile, T)));
      for (int64_t t0 = 0; t0 < T; t0 += kTile) {
        const int64_t tb = std::min(kTile, T - t0);
        transpose(a + t0 * rows, tb, rows, aT.data());
        transpose(b + t0 * cols, tb, cols, bT.data());
        const X* ap = aT.data();
        const X* bp = bT.data();
        at::parallel_for(0, rows, 8, [&](int64_t r0, int64_t r1) {
          for (int64_t r = r0; r < r1; ++r) {
            const X* ar = ap + r * tb;
            for (int64_t k = rp[r]; k < rp[r + 1]; ++k) op[k] += Dot<X>::run(ar, bp + col_of(idx, k, r, cols) * tb, tb);
          }
        });
      }
      return kSuccess;
    });
  });
}

}  // namespace sparse_delta
}  // namespace slimtune
