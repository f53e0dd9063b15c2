// CPU kernels of the sparse-delta family (at::parallel_for over raw pointers).
#include <ATen/Parallel.h>

#include <algorithm>
#include <type_traits>
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

// y[i] += v·x[i] for i < n: lanes are tokens, each computed alone, so a token's result is the
// same in a tile of one or of many. Float32 is cloned for AVX2+FMA and AVX-512 like dot_f32.
template <typename A>
void axpy(A* __restrict__ y, const A* __restrict__ x, A v, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] += v * x[i];
}

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
__attribute__((target_clones("avx512f", "arch=haswell", "default")))
#endif
void axpy_f32(float* __restrict__ y, const float* __restrict__ x, float v, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] += v * x[i];
}

template <>
void axpy<float>(float* __restrict__ y, const float* __restrict__ x, float v, int64_t n) {
  axpy_f32(y, x, v, n);
}

// Tokens per SpMM tile: the transposed operand tiles (d × tile accumulators) stay in cache.
constexpr int64_t kSpmmTile = 64;

// Transposes in 16×16 blocks: both sides of a block stay in a few cache lines.
constexpr int64_t kBlock = 16;

// dst (n × m, type A) = srcᵀ for src (m × n, type X), both contiguous, widened to A.
template <typename X, typename A>
void transpose_to(const X* src, int64_t m, int64_t n, A* dst) {
  for (int64_t i0 = 0; i0 < m; i0 += kBlock) {
    const int64_t i1 = std::min(m, i0 + kBlock);
    for (int64_t j0 = 0; j0 < n; j0 += kBlock) {
      const int64_t j1 = std::min(n, j0 + kBlock);
      for (int64_t i = i0; i < i1; ++i) {
        for (int64_t j = j0; j < j1; ++j) dst[j * m + i] = static_cast<A>(src[i * n + j]);
      }
    }
  }
}

template <typename X>
void transpose(const X* src, int64_t m, int64_t n, X* dst) {
  transpose_to<X, X>(src, m, n, dst);
}

// out (m × n) = base + srcᵀ (+ bias[j] on column j) for src (n × m), rounded once to X; base is out's
// own value where kAccumulate (then A is X), else 0; bias may be null.
template <bool kAccumulate, typename A, typename X>
void store_transposed(const A* src, int64_t m, int64_t n, const A* bias, X* out) {
  for (int64_t i0 = 0; i0 < m; i0 += kBlock) {
    const int64_t i1 = std::min(m, i0 + kBlock);
    for (int64_t j0 = 0; j0 < n; j0 += kBlock) {
      const int64_t j1 = std::min(n, j0 + kBlock);
      for (int64_t i = i0; i < i1; ++i) {
        for (int64_t j = j0; j < j1; ++j) {
          const A term = bias == nullptr ? src[j * m + i] : src[j * m + i] + bias[j];
          if constexpr (kAccumulate) {
            out[i * n + j] += term;
          } else {
            out[i * n + j] = static_cast<X>(term);
          }
        }
      }
    }
  }
}

// Calls f(X{}, indices, values) with the dense type of an SpMM and its typed CSR arrays (no tokens:
// nothing to do).
template <typename F>
Status dispatch_spmm(const SpmmOperands& p, F&& f) {
  if (p.T == 0) return kSuccess;
  return dispatch_delta<CpuFloats>(p.dtype, p.index_type, p.value_dtype, [&](auto x_tag, auto i_tag, auto v_tag) {
    return f(x_tag, static_cast<const decltype(i_tag)*>(p.indices), static_cast<const decltype(v_tag)*>(p.values));
  });
}

}  // namespace

Status merge_cpu(const MergeParams& p, void*) {
  if (p.n == 0) return kSuccess;
  const DType w = p.weight_dtype;
  return dispatch_delta<CpuFloats>(w, p.index_type, p.value_dtype, [&](auto w_tag, auto i_tag, auto v_tag) {
    using W = decltype(w_tag);
    using A = acc_t<W>;
    W* weight = static_cast<W*>(p.weight);
    const auto* indices = static_cast<const decltype(i_tag)*>(p.indices);
    const auto* values = static_cast<const decltype(v_tag)*>(p.values);
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
}

namespace {

// Both directions per tile of tokens: the dense operand's tile transposed into the accumulation
// type (d × tile), each entry one axpy over the tile's tokens into a transposed accumulator tile
// summed from 0 in row-major entry order, then the bias and base added and rounded once. Per output element
// that is the order of the CUDA kernels, whatever the tile size. kTransposed: dx = g·Δ (entry (r, c) adds g's column r into column c), else y = x·Δᵀ (x's
// column c into column r); src is T × in_w, out T × out_w, bias (out_w, may be null) in X, the base
// out's own value where `accumulate`.
template <bool kTransposed>
Status spmm_tiles(const SpmmOperands& p, const void* src, const void* bias, void* out, bool accumulate) {
  const int64_t T = p.T, rows = p.rows, cols = p.cols;
  const int64_t in_w = kTransposed ? rows : cols, out_w = kTransposed ? cols : rows;
  return dispatch_spmm(p, [&](auto x_tag, auto idx, auto vp) {
    using X = decltype(x_tag);
    using A = acc_t<X>;
    if (accumulate && !std::is_same_v<A, X>) return kInvalidValue;  // a rounded base: never
    const int64_t* rp = p.rowptr;
    const X* sp = static_cast<const X*>(src);
    X* outp = static_cast<X*>(out);
    std::vector<A> bias_acc;
    if (bias != nullptr) {
      const X* b = static_cast<const X*>(bias);
      bias_acc.assign(b, b + out_w);
    }
    const A* bp = bias == nullptr ? nullptr : bias_acc.data();
    at::parallel_for(0, (T + kSpmmTile - 1) / kSpmmTile, 1, [&](int64_t b0, int64_t b1) {
      std::vector<A> srcT(static_cast<size_t>(in_w * kSpmmTile)), accT(static_cast<size_t>(out_w * kSpmmTile));
      for (int64_t blk = b0; blk < b1; ++blk) {
        const int64_t t0 = blk * kSpmmTile, tb = std::min(kSpmmTile, T - t0);
        transpose_to(sp + t0 * in_w, tb, in_w, srcT.data());
        std::fill(accT.begin(), accT.begin() + out_w * tb, A(0));
        for (int64_t r = 0; r < rows; ++r) {
          for (int64_t k = rp[r]; k < rp[r + 1]; ++k) {
            const int64_t c = col_of(idx, k, r, cols);
            if constexpr (kTransposed) {
              axpy<A>(accT.data() + c * tb, srcT.data() + r * tb, static_cast<A>(vp[k]), tb);
            } else {
              axpy<A>(accT.data() + r * tb, srcT.data() + c * tb, static_cast<A>(vp[k]), tb);
            }
          }
        }
        if constexpr (std::is_same_v<A, X>) {
          if (accumulate) {
            store_transposed<true>(accT.data(), tb, out_w, bp, outp + t0 * out_w);
            continue;
          }
        }
        store_transposed<false>(accT.data(), tb, out_w, bp, outp + t0 * out_w);
      }
    });
    return kSuccess;
  });
}

}  // namespace

Status spmm_cpu(const SpmmParams& p, void*) { return spmm_tiles<false>(p, p.x, p.bias, p.out, p.accumulate); }

Status spmm_t_cpu(const SpmmTParams& p, void*) { return spmm_tiles<true>(p, p.g, nullptr, p.out, p.accumulate); }

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
