// CPU kernels of the sparse-delta family (at::parallel_for over raw pointers).
#include <ATen/Parallel.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "common/acc.h"
#include "common/cpu_dispatch.h"
#include "common/cpu_features.h"
#include "sparse_delta/sparse_delta.h"

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define SLIMTUNE_SPARSE_AVX512 1
#include <immintrin.h>

#include "common/avx512_lanes.h"
#endif

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

#ifdef SLIMTUNE_SPARSE_AVX512
#define SLIMTUNE_AVX512_FN __attribute__((target("avx512f")))

// 16 elements as float32: exact for every type here (16-bit floats widen without rounding).
SLIMTUNE_AVX512_FN inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
SLIMTUNE_AVX512_FN inline __m512 load16(const c10::BFloat16* p) {
  return avx512_lanes::widen_bf16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
SLIMTUNE_AVX512_FN inline __m512 load16(const c10::Half* p) {
  return avx512_lanes::widen_half(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}

// The 16×16 block at src (row stride ss) as float32, transposed in registers: out[c] is its column
// c. Pairs of rows interleave 32-bit, then 64-bit elements, leaving in each 128-bit lane L of
// v[4g + j] rows 4g..4g+3 of column 4L + j; two rounds of lane shuffles gather column 4L + j from
// v[j], v[4 + j], v[8 + j], v[12 + j].
template <typename X>
SLIMTUNE_AVX512_FN inline void transpose16(const X* src, int64_t ss, __m512 out[16]) {
  __m512 v[16], t[16];
  for (int i = 0; i < 16; ++i) v[i] = load16(src + i * ss);
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_ps(v[i], v[i + 1]);
    t[i + 1] = _mm512_unpackhi_ps(v[i], v[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {
    const __m512d a = _mm512_castps_pd(t[i]), b = _mm512_castps_pd(t[i + 1]);
    const __m512d c = _mm512_castps_pd(t[i + 2]), d = _mm512_castps_pd(t[i + 3]);
    v[i] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, c));
    v[i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, c));
    v[i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(b, d));
    v[i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(b, d));
  }
  for (int j = 0; j < 4; ++j) {
    const __m512 even01 = _mm512_shuffle_f32x4(v[j], v[4 + j], 0x88);
    const __m512 odd01 = _mm512_shuffle_f32x4(v[j], v[4 + j], 0xDD);
    const __m512 even23 = _mm512_shuffle_f32x4(v[8 + j], v[12 + j], 0x88);
    const __m512 odd23 = _mm512_shuffle_f32x4(v[8 + j], v[12 + j], 0xDD);
    out[j] = _mm512_shuffle_f32x4(even01, even23, 0x88);
    out[4 + j] = _mm512_shuffle_f32x4(odd01, odd23, 0x88);
    out[8 + j] = _mm512_shuffle_f32x4(even01, even23, 0xDD);
    out[12 + j] = _mm512_shuffle_f32x4(odd01, odd23, 0xDD);
  }
}

// dst rows j0.. of the transposed block: dst[(j0 + c) * m + i0 ..] = column c of src's block.
template <typename X>
SLIMTUNE_AVX512_FN inline void copy_block16(const X* src, int64_t n, float* dst, int64_t m) {
  __m512 c[16];
  transpose16(src, n, c);
  for (int j = 0; j < 16; ++j) _mm512_storeu_ps(dst + j * m, c[j]);
}

// 16 float32 lanes rounded once to X and stored, as static_cast<X> rounds a float.
SLIMTUNE_AVX512_FN inline void store16(float* p, __m512 v) { _mm512_storeu_ps(p, v); }
SLIMTUNE_AVX512_FN inline void store16(c10::BFloat16* p, __m512 v) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(avx512_lanes::round_bf16(v)));
}
SLIMTUNE_AVX512_FN inline void store16(c10::Half* p, __m512 v) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(avx512_lanes::round_half(v)));
}

// out rows of a block of srcᵀ: out[i * n + j] = base + src[j * m + i] (+ bias[j]), rounded once to
// X; base is out's own value where kAccumulate (float32 only), else 0; bias may be null.
template <bool kAccumulate, typename X>
SLIMTUNE_AVX512_FN inline void store_block16(const float* src, int64_t m, const float* bias, X* out, int64_t n) {
  __m512 c[16];
  transpose16(src, m, c);
  const __m512 b = bias == nullptr ? _mm512_setzero_ps() : _mm512_loadu_ps(bias);
  for (int i = 0; i < 16; ++i) {
    __m512 v = bias == nullptr ? c[i] : _mm512_add_ps(c[i], b);
    if constexpr (kAccumulate) v = _mm512_add_ps(load16(out + i * n), v);
    store16(out + i * n, v);
  }
}

// The masks of the 16-lane vectors covering n <= 64 tokens: full ones, a partial last one, and
// empty ones past it (their masked loads read nothing).
SLIMTUNE_AVX512_FN inline void token_masks(int64_t n, __mmask16 m[4]) {
  for (int j = 0; j < 4; ++j) {
    const int64_t left = n - 16 * j;
    m[j] = left >= 16 ? static_cast<__mmask16>(0xFFFF) : left <= 0 ? 0 : static_cast<__mmask16>((1u << left) - 1u);
  }
}

// acc[0, n) = Σ_k values[k]·srcT[(idx[k] - base) * n ..] over entries [k0, k1) in order, from 0,
// one fused multiply-add per entry and token (n <= 64: the sums stay in registers).
template <typename I, typename V>
SLIMTUNE_AVX512_FN void row_sum_avx512(float* acc, const float* srcT, int64_t n, const I* idx, const V* values,
                                       int64_t k0, int64_t k1, int64_t base) {
  __mmask16 m[4];
  token_masks(n, m);
  __m512 s[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
  for (int64_t k = k0; k < k1; ++k) {
    const float* x = srcT + (static_cast<int64_t>(idx[k]) - base) * n;
    const __m512 v = _mm512_set1_ps(static_cast<float>(values[k]));
    for (int j = 0; j < 4; ++j) s[j] = _mm512_fmadd_ps(v, _mm512_maskz_loadu_ps(m[j], x + 16 * j), s[j]);
  }
  for (int j = 0; j < 4; ++j) _mm512_mask_storeu_ps(acc + 16 * j, m[j], s[j]);
}

// Σ a[i]·b[i] over i < n in two vector partial sums, then across lanes.
SLIMTUNE_AVX512_FN inline float dot_avx512(const float* a, const float* b, int64_t n) {
  __m512 s0 = _mm512_setzero_ps(), s1 = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    s0 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), s0);
    s1 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i + 16), _mm512_loadu_ps(b + i + 16), s1);
  }
  for (; i < n; i += 16) {
    const __mmask16 m = n - i >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << (n - i)) - 1u);
    s0 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, a + i), _mm512_maskz_loadu_ps(m, b + i), s0);
  }
  return _mm512_reduce_add_ps(_mm512_add_ps(s0, s1));
}
#undef SLIMTUNE_AVX512_FN
#endif

// True where the float32 work goes through the AVX-512 forms above.
template <typename A>
bool vector_rows() {
#ifdef SLIMTUNE_SPARSE_AVX512
  return std::is_same_v<A, float> && cpu_avx512();
#else
  return false;
#endif
}

// The storage types whose blocks the AVX-512 forms widen to float32.
template <typename X>
constexpr bool kWidens = std::is_same_v<X, float> || std::is_same_v<X, c10::BFloat16> || std::is_same_v<X, c10::Half>;

// True where a whole 16×16 block goes through the AVX-512 forms above.
template <typename X, typename A>
bool vector_blocks() {
  return kWidens<X> && vector_rows<A>();
}

// dst (n × m, type A) = srcᵀ for src (m × n, type X), both contiguous, widened to A; the column
// blocks [b0, b1) of src only (of kBlock columns each).
template <typename X, typename A>
void transpose_columns(const X* src, int64_t m, int64_t n, A* dst, int64_t b0, int64_t b1) {
  [[maybe_unused]] const bool vec = vector_blocks<X, A>();
  for (int64_t i0 = 0; i0 < m; i0 += kBlock) {
    const int64_t i1 = std::min(m, i0 + kBlock);
    for (int64_t j0 = b0 * kBlock; j0 < std::min(n, b1 * kBlock); j0 += kBlock) {
      const int64_t j1 = std::min(n, j0 + kBlock);
#ifdef SLIMTUNE_SPARSE_AVX512
      if constexpr (kWidens<X> && std::is_same_v<A, float>) {
        if (vec && i1 - i0 == kBlock && j1 - j0 == kBlock) {
          copy_block16(src + i0 * n + j0, n, dst + j0 * m + i0, m);
          continue;
        }
      }
#endif
      for (int64_t i = i0; i < i1; ++i) {
        for (int64_t j = j0; j < j1; ++j) dst[j * m + i] = static_cast<A>(src[i * n + j]);
      }
    }
  }
}

template <typename X, typename A>
void transpose_to(const X* src, int64_t m, int64_t n, A* dst) {
  transpose_columns(src, m, n, dst, 0, (n + kBlock - 1) / kBlock);
}

// transpose_to with the column blocks in parallel (the SDDMM's tiles, each needed whole before any
// dot starts).
template <typename X, typename A>
void transpose(const X* src, int64_t m, int64_t n, A* dst) {
  at::parallel_for(0, (n + kBlock - 1) / kBlock, 8,
                   [&](int64_t b0, int64_t b1) { transpose_columns(src, m, n, dst, b0, b1); });
}

// out (m × n) = base + srcᵀ (+ bias[j] on column j) for src (n × m), rounded once to X; base is out's
// own value where kAccumulate (then A is X), else 0; bias may be null.
template <bool kAccumulate, typename A, typename X>
void store_transposed(const A* src, int64_t m, int64_t n, const A* bias, X* out) {
  [[maybe_unused]] const bool vec = vector_blocks<X, A>();
  for (int64_t i0 = 0; i0 < m; i0 += kBlock) {
    const int64_t i1 = std::min(m, i0 + kBlock);
    for (int64_t j0 = 0; j0 < n; j0 += kBlock) {
      const int64_t j1 = std::min(n, j0 + kBlock);
#ifdef SLIMTUNE_SPARSE_AVX512
      if constexpr (kWidens<X> && std::is_same_v<A, float>) {
        if (vec && i1 - i0 == kBlock && j1 - j0 == kBlock) {
          store_block16<kAccumulate>(src + j0 * m + i0, m, bias == nullptr ? nullptr : bias + j0, out + i0 * n + j0, n);
          continue;
        }
      }
#endif
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

// The delta's entries grouped by column (dx's outputs), each column's in ascending row order: a
// stable counting sort of the row-major CSR, O(K + cols) per call, no tensor kept.
template <typename I, typename V, typename A>
struct ColumnMajor {
  std::vector<int64_t> ptr;  // cols + 1
  std::vector<int64_t> rows;
  std::vector<A> values;

  ColumnMajor(const I* idx, const V* vp, const int64_t* rp, int64_t nrows, int64_t cols)
      : ptr(static_cast<size_t>(cols + 1), 0), rows(static_cast<size_t>(rp[nrows])), values(rows.size()) {
    for (int64_t r = 0; r < nrows; ++r) {
      for (int64_t k = rp[r]; k < rp[r + 1]; ++k) ++ptr[col_of(idx, k, r, cols) + 1];
    }
    for (int64_t c = 0; c < cols; ++c) ptr[c + 1] += ptr[c];
    std::vector<int64_t> next(ptr.begin(), ptr.end() - 1);
    for (int64_t r = 0; r < nrows; ++r) {
      for (int64_t k = rp[r]; k < rp[r + 1]; ++k) {
        const int64_t j = next[col_of(idx, k, r, cols)]++;
        rows[j] = r;
        values[j] = static_cast<A>(vp[k]);
      }
    }
  }
};

// out[t, o] = base + Σ_{j in [ptr[o], ptr[o + 1])} values[j]·src[t, in_of(j)] (+ bias[o]) for each output o,
// per tile of tokens: src's tile transposed into the accumulation type (d × tile), each output's
// sum formed from 0 in entry order over the tile's tokens, then the bias and the base added and
// rounded once (the order of the CUDA kernels, whatever the tile size). in_of(j) = idx[j] - o·stride:
// the forward over the row-major CSR (stride cols), dx over ColumnMajor (stride 0). src is T × in_w,
// out T × out_w, bias (out_w, may be null) in X, the base out's own value where `accumulate`.
template <typename X, typename I, typename V>
Status spmm_rows(int64_t T, int64_t in_w, int64_t out_w, const int64_t* ptr, const I* idx, int64_t stride,
                 const V* vp, const X* sp, const X* bias, X* outp, bool accumulate) {
  using A = acc_t<X>;
  if (accumulate && !std::is_same_v<A, X>) return kInvalidValue;  // a rounded base: never
  std::vector<A> bias_acc;
  if (bias != nullptr) bias_acc.assign(bias, bias + out_w);
  const A* bp = bias == nullptr ? nullptr : bias_acc.data();
  [[maybe_unused]] const bool vec = vector_rows<A>();
  at::parallel_for(0, (T + kSpmmTile - 1) / kSpmmTile, 1, [&](int64_t b0, int64_t b1) {
    std::vector<A> srcT(static_cast<size_t>(in_w * kSpmmTile)), accT(static_cast<size_t>(out_w * kSpmmTile));
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t t0 = blk * kSpmmTile, tb = std::min(kSpmmTile, T - t0);
      transpose_to(sp + t0 * in_w, tb, in_w, srcT.data());
      for (int64_t o = 0; o < out_w; ++o) {
        A* acc = accT.data() + o * tb;
#ifdef SLIMTUNE_SPARSE_AVX512
        if constexpr (std::is_same_v<A, float>) {
          if (vec) {
            row_sum_avx512(acc, srcT.data(), tb, idx, vp, ptr[o], ptr[o + 1], o * stride);
            continue;
          }
        }
#endif
        std::fill(acc, acc + tb, A(0));
        for (int64_t k = ptr[o]; k < ptr[o + 1]; ++k) {
          axpy<A>(acc, srcT.data() + (static_cast<int64_t>(idx[k]) - o * stride) * tb, static_cast<A>(vp[k]), tb);
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
}

}  // namespace

// y = x·Δᵀ: each delta row is an output, its entries in row-major order.
Status spmm_cpu(const SpmmParams& p, void*) {
  return dispatch_spmm(p, [&](auto x_tag, auto idx, auto vp) {
    using X = decltype(x_tag);
    return spmm_rows<X>(p.T, p.cols, p.rows, p.rowptr, idx, p.cols, vp, static_cast<const X*>(p.x),
                        static_cast<const X*>(p.bias), static_cast<X*>(p.out), p.accumulate);
  });
}

// dx = g·Δ: each delta column is an output, its entries in ascending row order.
Status spmm_t_cpu(const SpmmTParams& p, void*) {
  return dispatch_spmm(p, [&](auto x_tag, auto idx, auto vp) {
    using X = decltype(x_tag);
    const ColumnMajor<std::remove_cv_t<std::remove_pointer_t<decltype(idx)>>,
                      std::remove_cv_t<std::remove_pointer_t<decltype(vp)>>, acc_t<X>>
        t(idx, vp, p.rowptr, p.rows, p.cols);
    return spmm_rows<X>(p.T, p.rows, p.cols, t.ptr.data(), t.rows.data(), 0, t.values.data(),
                        static_cast<const X*>(p.g), nullptr, static_cast<X*>(p.out), p.accumulate);
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
      // copy of the tile of each operand in the accumulation type (d × tile, sized to stay in
      // cache) makes every d v_k a contiguous dot, and a row of aᵀ is reused by every entry of
      // that row. Tiles are summed in a fixed order, so the result is deterministic.
      constexpr int64_t kTile = 128;
      [[maybe_unused]] const bool vec = vector_rows<A>();
      std::vector<A> aT(static_cast<size_t>(rows * std::min(kTile, T)));
      std::vector<A> bT(static_cast<size_t>(cols * std::min(kTile, T)));
      for (int64_t t0 = 0; t0 < T; t0 += kTile) {
        const int64_t tb = std::min(kTile, T - t0);
        transpose(a + t0 * rows, tb, rows, aT.data());
        transpose(b + t0 * cols, tb, cols, bT.data());
        const A* ap = aT.data();
        const A* bp = bT.data();
        at::parallel_for(0, rows, 8, [&](int64_t r0, int64_t r1) {
          for (int64_t r = r0; r < r1; ++r) {
            const A* ar = ap + r * tb;
#ifdef SLIMTUNE_SPARSE_AVX512
            if constexpr (std::is_same_v<A, float>) {
              if (vec) {
                for (int64_t k = rp[r]; k < rp[r + 1]; ++k) {
                  op[k] += dot_avx512(ar, bp + col_of(idx, k, r, cols) * tb, tb);
                }
                continue;
              }
            }
#endif
            for (int64_t k = rp[r]; k < rp[r + 1]; ++k) op[k] += Dot<A>::run(ar, bp + col_of(idx, k, r, cols) * tb, tb);
          }
        });
      }
      return kSuccess;
    });
  });
}

}  // namespace sparse_delta
}  // namespace slimtune
