// CPU kernels of the LoRA family (at::parallel_for over raw pointers): the passes of lora.h, one
// row at a time, the row's mask expanded from Philox bits into per-element multipliers; float32
// on AVX-512 takes the AVX-512 row work below, which applies the bits as vector masks.
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "common/acc.h"
#include "common/cpu_dispatch.h"
#include "common/cpu_features.h"
#include "common/philox.h"
#include "common/philox_cpu.h"
#include "lora/lora.h"

// AVX-512 forms of the float32 row work of the passes with dropout: the keep bits
// (common/philox_cpu) are the vector mask registers themselves, so no per-element multipliers
// are expanded and no masked copy of x is made for the gradient. Rows start on a mask byte
// (K % 8 == 0). Callers check cpu_avx512() first.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define SLIMTUNE_LORA_AVX512 1
#include <immintrin.h>

namespace slimtune {
namespace lora {
namespace avx512 {

#define SLIMTUNE_AVX512_FN __attribute__((target("avx512f")))

// The keep mask of elements e .. e + n - 1 (n <= 16, e % 8 == 0) of the bits.
SLIMTUNE_AVX512_FN inline __mmask16 keep_mask(const uint8_t* bits, int64_t e, int64_t n) {
  if (n > 8) {
    uint16_t k;
    std::memcpy(&k, bits + e / 8, 2);
    return static_cast<__mmask16>(k & ((1u << n) - 1u));
  }
  return static_cast<__mmask16>(bits[e / 8] & ((1u << n) - 1u));
}

SLIMTUNE_AVX512_FN inline __mmask16 first_n(int64_t n) { return static_cast<__mmask16>((1u << n) - 1u); }

// v_i = keep * mult * x_i for the nb rows x + i * rs (K floats each), bit i * K + c of `bits`.
SLIMTUNE_AVX512_FN inline void masked_rows(const float* x, int64_t rs, int64_t nb, int64_t K, const uint8_t* bits,
                                           float mult, float* v) {
  const __m512 m = _mm512_set1_ps(mult);
  for (int64_t i = 0; i < nb; ++i) {
    for (int64_t j = 0; j < K; j += 16) {
      const int64_t n = std::min<int64_t>(16, K - j);
      const __m512 xv = _mm512_maskz_loadu_ps(first_n(n), x + i * rs + j);
      _mm512_mask_storeu_ps(v + i * K + j, first_n(n), _mm512_maskz_mul_ps(keep_mask(bits, i * K + j, n), xv, m));
    }
  }
}

// The row work takes blocks of kWideRows rows: each row of a (R x K, in L2) and of the dA
// partial is streamed through L1 once per block, so twice the rows halve that traffic.
constexpr int kWideRows = 8;

// out[i] = v[i] . a for the N rows v[i] (K floats each): N independent FMA chains, N + 1 loads per
// N FMAs. (Two rows of a at a time, 2 N chains, measured slower.)
template <int N>
SLIMTUNE_AVX512_FN inline void dots(const float* const* v, const float* a, int64_t K, float* out) {
  __m512 s[N];
  for (int i = 0; i < N; ++i) s[i] = _mm512_setzero_ps();
  int64_t j = 0;
  for (; j + 16 <= K; j += 16) {
    const __m512 aj = _mm512_loadu_ps(a + j);
    for (int i = 0; i < N; ++i) s[i] = _mm512_fmadd_ps(_mm512_loadu_ps(v[i] + j), aj, s[i]);
  }
  if (j < K) {
    const __mmask16 k = first_n(K - j);
    const __m512 aj = _mm512_maskz_loadu_ps(k, a + j);
    for (int i = 0; i < N; ++i) s[i] = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(k, v[i] + j), aj, s[i]);
  }
  for (int i = 0; i < N; ++i) out[i] = _mm512_reduce_add_ps(s[i]);
}

// out[i * ld + q] = x_i . a_q for the nb rows x_i = x + i * rs and the Q rows a_q = a + q * K. The
// N - nb chains past them run on `pad` (any K readable floats) and are dropped.
template <int N>
SLIMTUNE_AVX512_FN inline void row_dots(const float* x, int64_t rs, int64_t nb, int64_t K, const float* pad,
                                        const float* a, int64_t Q, float* out, int64_t ld) {
  const float* v[N];
  for (int i = 0; i < N; ++i) v[i] = i < nb ? x + i * rs : pad;
  float d[N];
  for (int64_t q = 0; q < Q; ++q) {
    dots<N>(v, a + q * K, K, d);
    for (int64_t i = 0; i < nb; ++i) out[i * ld + q] = d[i];
  }
}

// Loads and stores of a column chunk: whole vectors (Full) or the first n lanes (the row's end).
template <bool Full>
SLIMTUNE_AVX512_FN inline __m512 load(__mmask16 cols, const float* p) {
  return Full ? _mm512_loadu_ps(p) : _mm512_maskz_loadu_ps(cols, p);
}
template <bool Full>
SLIMTUNE_AVX512_FN inline void store(__mmask16 cols, float* p, __m512 v) {
  if (Full) {
    _mm512_storeu_ps(p, v);
  } else {
    _mm512_mask_storeu_ps(p, cols, v);
  }
}

// grad_rows on the n columns j .. j + n - 1 (n == 16 when Full).
template <int N, bool Full>
SLIMTUNE_AVX512_FN inline void grad_chunk(const float* x, int64_t rs, int64_t nb, int64_t K, int64_t R,
                                          const float* gq, const float* a, const uint8_t* bits, __m512 m, float* acc,
                                          float* dx, bool accumulate, int64_t j, int64_t n) {
  const __mmask16 cols = first_n(n);
  __mmask16 keep[N];
  for (int i = 0; i < N; ++i) keep[i] = i < nb ? keep_mask(bits, i * K + j, n) : 0;
  if (acc != nullptr) {
    __m512 v[N];
    for (int i = 0; i < N; ++i) {
      v[i] = i < nb ? _mm512_maskz_mul_ps(keep[i], load<Full>(cols, x + i * rs + j), m) : _mm512_setzero_ps();
    }
    for (int64_t q = 0; q < R; ++q) {
      const float* g = gq + q * N;
      __m512 t = _mm512_mul_ps(_mm512_set1_ps(g[0]), v[0]);
      for (int i = 1; i < N; ++i) t = _mm512_fmadd_ps(_mm512_set1_ps(g[i]), v[i], t);
      float* y = acc + q * K + j;
      store<Full>(cols, y, _mm512_add_ps(load<Full>(cols, y), t));
    }
  }
  if (dx != nullptr) {
    __m512 s[N];
    for (int i = 0; i < N; ++i) s[i] = _mm512_setzero_ps();
    for (int64_t q = 0; q < R; ++q) {
      const __m512 aq = load<Full>(cols, a + q * K + j);
      for (int i = 0; i < N; ++i) s[i] = _mm512_fmadd_ps(_mm512_set1_ps(gq[q * N + i]), aq, s[i]);
    }
    for (int64_t i = 0; i < nb; ++i) {
      float* d = dx + i * K + j;
      __m512 r = _mm512_maskz_mul_ps(keep[i], s[i], m);
      if (accumulate) r = _mm512_add_ps(load<Full>(cols, d), r);
      store<Full>(cols, d, r);
    }
  }
}

// The gradient pass on N rows (nb of them real; gq[q * N + i] = gb[t0 + i, q], 0 past nb):
// acc[q * K + c] += sum_i gq[q * N + i] * keep * mult * x_i[c] (when acc is set) and
// dx_i[c] (+)= keep * mult * sum_q gq[q * N + i] * a[q * K + c] (when dx is set). Column chunks
// outermost: the chunk of the N masked x rows stays in registers across every q.
template <int N>
SLIMTUNE_AVX512_FN inline void grad_rows(const float* x, int64_t rs, int64_t nb, int64_t K, int64_t R,
                                         const float* gq, const float* a, const uint8_t* bits, float mult, float* acc,
                                         float* dx, bool accumulate) {
  const __m512 m = _mm512_set1_ps(mult);
  int64_t j = 0;
  for (; j + 16 <= K; j += 16) grad_chunk<N, true>(x, rs, nb, K, R, gq, a, bits, m, acc, dx, accumulate, j, 16);
  if (j < K) grad_chunk<N, false>(x, rs, nb, K, R, gq, a, bits, m, acc, dx, accumulate, j, K - j);
}

#undef SLIMTUNE_AVX512_FN

}  // namespace avx512
}  // namespace lora
}  // namespace slimtune
#endif

// The rows' dot products and axpys are the passes' work: compile them for
// wide vector units too and let the loader pick (GCC ifunc clones; other compilers get one copy).
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define SLIMTUNE_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#define SLIMTUNE_INLINE __attribute__((always_inline)) inline
#else
#define SLIMTUNE_CLONES
#define SLIMTUNE_INLINE inline
#endif

namespace slimtune {
namespace lora {
namespace {

// Expands keep bits to per-element multipliers (mult or 0) through a 256-entry table of
// 8 values, so a block costs one table copy. One per thread: it owns its scratch.
template <typename A>
class Multipliers {
 public:
  Multipliers(A mult, uint32_t thresh, uint64_t seed, uint64_t offset)
      : mult_(mult), thresh_(thresh), seed_(seed), offset_(offset) {
    if (thresh_ == 0) return;
    lut_.resize(256 * philox::kElemsPerBlock);
    for (int v = 0; v < 256; ++v) {
      for (int i = 0; i < philox::kElemsPerBlock; ++i) {
        lut_[v * philox::kElemsPerBlock + i] = ((v >> i) & 1) ? mult : A(0);
      }
    }
  }

  // The keep bits of elements e0 .. e0 + n - 1 (bit e - e0 for element e; e0 on a block
  // boundary), valid until the next call.
  const uint8_t* keep(int64_t e0, int64_t n) {
    constexpr int64_t E = philox::kElemsPerBlock;
    const int64_t b0 = e0 / E, b1 = (e0 + n + E - 1) / E;
    if (thresh_ == 0) {  // every element kept: no draws
      bytes_.assign(static_cast<size_t>(b1 - b0), uint8_t{0xFF});
      return bytes_.data();
    }
    bytes_.resize(static_cast<size_t>(b1 - b0));
    philox::keep_bytes(seed_, philox::kMaskStream, offset_ + static_cast<uint64_t>(b0), b1 - b0, thresh_,
                       bytes_.data());
    return bytes_.data();
  }

  // out[j] = keep(e0 + j) ? mult : 0 for j < n.
  void row(int64_t e0, int64_t n, A* out) {
    if (thresh_ == 0) {
      std::fill(out, out + n, mult_);
      return;
    }
    constexpr int64_t E = philox::kElemsPerBlock;
    const int64_t b0 = e0 / E, b1 = (e0 + n + E - 1) / E;
    keep(b0 * E, e0 + n - b0 * E);
    const int64_t skip = e0 - b0 * E;  // elements of the first block before e0
    int64_t j = 0;
    for (int64_t k = 0; k < b1 - b0; ++k) {
      const A* v = lut_.data() + bytes_[k] * E;
      const int64_t lo = k == 0 ? skip : 0;
      const int64_t cnt = std::min<int64_t>(E - lo, n - j);
      if (cnt == E) {
        std::copy(v, v + E, out + j);
      } else {
        std::copy(v + lo, v + lo + cnt, out + j);
      }
      j += cnt;
    }
  }

 private:
  A mult_;
  uint32_t thresh_;
  uint64_t seed_, offset_;
  std::vector<A> lut_;
  std::vector<uint8_t> bytes_;
};

inline int64_t row_grain(int64_t cols) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(cols, 1)); }

// The passes work on blocks of kRows rows: each row of a (R x K, in L2) is read once per block
// instead of once per row. Inner loops on contiguous rows, vectorized per clone; the dot
// products keep 16 independent partial sums per row, so no reassociation is needed.
constexpr int kRows = 4;

// target_clones takes no templates: each row kernel NAME is written once as the template
// NAME_impl(p, q, n, out), and this stamps out its cloned float and double overloads. The impls
// must be inlined into the clones: a call out of line runs the baseline (SSE2) code.
#define SLIMTUNE_ROW_CLONES(NAME)                                                                                 \
  SLIMTUNE_CLONES void NAME(const float* p, const float* q, int64_t n, float* out) { NAME##_impl(p, q, n, out); } \
  SLIMTUNE_CLONES void NAME(const double* p, const double* q, int64_t n, double* out) { NAME##_impl(p, q, n, out); }

// out[i] = v_i . a for the kRows rows v_i = v + i * n.
template <typename A>
SLIMTUNE_INLINE void dot_rows_impl(const A* v, const A* a, int64_t n, A* out) {
  constexpr int L = 16;
  const A *__restrict__ v0 = v, *__restrict__ v1 = v + n, *__restrict__ v2 = v + 2 * n, *__restrict__ v3 = v + 3 * n;
  A s0[L] = {}, s1[L] = {}, s2[L] = {}, s3[L] = {};
  int64_t j = 0;
  for (; j + L <= n; j += L) {
    for (int l = 0; l < L; ++l) {
      const A aj = a[j + l];
      s0[l] += v0[j + l] * aj;
      s1[l] += v1[j + l] * aj;
      s2[l] += v2[j + l] * aj;
      s3[l] += v3[j + l] * aj;
    }
  }
  A* sums[kRows] = {s0, s1, s2, s3};
  for (int i = 0; i < kRows; ++i) {
    A s = A(0);
    for (int l = 0; l < L; ++l) s += sums[i][l];
    for (int64_t k = j; k < n; ++k) s += v[i * n + k] * a[k];
    out[i] = s;
  }
}
SLIMTUNE_ROW_CLONES(dot_rows)

// y += sum_i g[i] * v_i over the kRows rows v_i = v + i * n.
template <typename A>
SLIMTUNE_INLINE void gather_rows_impl(const A* g, const A* v, int64_t n, A* y) {
  const A g0 = g[0], g1 = g[1], g2 = g[2], g3 = g[3];
  for (int64_t j = 0; j < n; ++j) y[j] += g0 * v[j] + g1 * v[n + j] + g2 * v[2 * n + j] + g3 * v[3 * n + j];
}
SLIMTUNE_ROW_CLONES(gather_rows)

// y_i += g[i] * a for the kRows rows y_i = y + i * n.
template <typename A>
SLIMTUNE_INLINE void scatter_rows_impl(const A* g, const A* a, int64_t n, A* y) {
  const A g0 = g[0], g1 = g[1], g2 = g[2], g3 = g[3];
  for (int64_t j = 0; j < n; ++j) {
    const A aj = a[j];
    y[j] += g0 * aj;
    y[n + j] += g1 * aj;
    y[2 * n + j] += g2 * aj;
    y[3 * n + j] += g3 * aj;
  }
}
SLIMTUNE_ROW_CLONES(scatter_rows)
#undef SLIMTUNE_ROW_CLONES
static_assert(kRows == 4, "gather_rows and scatter_rows take 4 rows");

// v[j] = x[j * cs] * m[j] (m holds keep * mult).
template <typename X, typename A>
void masked_row(const X* x, int64_t cs, const A* m, int64_t n, A* v) {
  if (cs == 1) {
    for (int64_t j = 0; j < n; ++j) v[j] = static_cast<A>(x[j]) * m[j];
  } else {
    for (int64_t j = 0; j < n; ++j) v[j] = static_cast<A>(x[j * cs]) * m[j];
  }
}

// The AVX-512 row work applies: float32 x and accumulators, unit column stride, rows starting on
// a mask byte.
template <typename X, typename A>
bool avx512_rows(int64_t x_cs, int64_t K) {
#ifdef SLIMTUNE_LORA_AVX512
  return std::is_same<X, float>::value && std::is_same<A, float>::value && x_cs == 1 && K % 8 == 0 &&
         cpu_avx512();
#else
  (void)x_cs, (void)K;
  return false;
#endif
}

template <typename A>
constexpr DType acc_tag() {
  return std::is_same<A, double>::value ? DType::Float64 : DType::Float32;
}

// Calls f(X{}, A{}) with x's storage type X and its accumulation type A, which the params'
// acc dtype must name.
template <typename F>
Status dispatch_pass(DType x_dtype, DType acc_dtype, F&& f) {
  return dispatch_cpu_float(x_dtype, [&](auto x_tag) {
    using A = acc_t<decltype(x_tag)>;
    if (acc_tag<A>() != acc_dtype) return kInvalidValue;
    return f(x_tag, A{});
  });
}

// Token splits of the gradient pass: fixed by T alone (not by the thread count), so the split
// sums, reduced in order, give the same bits on any machine.
constexpr int64_t kSplitRows = 256, kMaxSplits = 16;
int64_t grad_splits(int64_t T) {
  return std::min<int64_t>(kMaxSplits, std::max<int64_t>(1, (T + kSplitRows - 1) / kSplitRows));
}

#ifdef SLIMTUNE_LORA_AVX512
// down_cpu's float32 work with a mask on AVX-512: blocks of kWideRows masked rows in a buffer
// (zeros past the last row), then their dot products with a's rows.
void down_avx512(const DownParams& p) {
  constexpr int N = avx512::kWideRows;
  const float* x = static_cast<const float*>(p.x);
  const float* a = static_cast<const float*>(p.a);
  float* out = static_cast<float*>(p.out);
  const int64_t K = p.K, R = p.R, blocks = (p.T + N - 1) / N;
  const float mult = static_cast<float>(p.mask.mult);
  at::parallel_for(0, blocks, row_grain(K * R * N / 16 + 1), [&](int64_t begin, int64_t end) {
    std::vector<float> v(static_cast<size_t>(N * K));
    Multipliers<float> mk(mult, p.mask.thresh, p.mask.seed, p.mask.offset);
    for (int64_t blk = begin; blk < end; ++blk) {
      const int64_t t0 = blk * N, nb = std::min<int64_t>(N, p.T - t0);
      avx512::masked_rows(x + t0 * p.x_rs, p.x_rs, nb, K, mk.keep(t0 * K, nb * K), mult, v.data());
      avx512::row_dots<N>(v.data(), K, nb, K, v.data(), a, R, out + t0 * p.out_ld, p.out_ld);
    }
  });
}
#endif

}  // namespace

Status dropout_mask_cpu(const DropoutMaskParams& p, void*) {
  const int64_t n = p.n;
  bool* out = p.out;
  constexpr int64_t chunk = 4096;
  at::parallel_for(0, (n + chunk - 1) / chunk, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> m(chunk);
    Multipliers<float> mk(1.0f, p.thresh, p.seed, p.offset);
    for (int64_t c = begin; c < end; ++c) {
      const int64_t e0 = c * chunk, len = std::min(chunk, n - e0);
      mk.row(e0, len, m.data());
      for (int64_t j = 0; j < len; ++j) out[e0 + j] = m[j] != 0.0f;
    }
  });
  return kSuccess;
}

// Measured at T = 2048, K = 1024: faster than MKL at ranks 8 and 16, slower at 32 and 64.
constexpr int64_t kMaxRankBeatingBlas = 16;

bool grad_beats_blas_cpu(DType x_dtype, int64_t K, int64_t x_cs, int64_t R) {
  return x_dtype == DType::Float32 && R <= kMaxRankBeatingBlas && avx512_rows<float, float>(x_cs, K);
}

int64_t down_partial_elems_cpu(int64_t, int64_t, int64_t) { return 0; }

int64_t grad_partial_elems_cpu(int64_t T, int64_t K, int64_t R, DType, bool need_dA) {
  const int64_t splits = grad_splits(T);
  return need_dA && splits > 1 ? splits * R * K : 0;
}

// Blocks of kRows rows: the masked rows in a buffer (zeros past the last row), then their R dot
// products with a's rows.
Status down_cpu(const DownParams& p, void*) {
  if (p.T == 0 || p.R == 0) return kSuccess;
  return dispatch_pass(p.x_dtype, p.acc_dtype, [&](auto x_tag, auto a_tag) {
    using X = decltype(x_tag);
    using A = decltype(a_tag);
#ifdef SLIMTUNE_LORA_AVX512
    if constexpr (std::is_same<X, float>::value) {
      if (avx512_rows<X, A>(p.x_cs, p.K)) {
        down_avx512(p);
        return kSuccess;
      }
    }
#endif
    const X* x = static_cast<const X*>(p.x);
    const A* a = static_cast<const A*>(p.a);
    A* out = static_cast<A*>(p.out);
    const int64_t K = p.K, R = p.R, blocks = (p.T + kRows - 1) / kRows;
    at::parallel_for(0, blocks, row_grain(K * R * kRows / 16 + 1), [&](int64_t begin, int64_t end) {
      std::vector<A> m(static_cast<size_t>(kRows * K)), v(static_cast<size_t>(kRows * K));
      Multipliers<A> mk(static_cast<A>(p.mask.mult), p.mask.thresh, p.mask.seed, p.mask.offset);
      A dots[kRows];
      for (int64_t blk = begin; blk < end; ++blk) {
        const int64_t t0 = blk * kRows, nb = std::min<int64_t>(kRows, p.T - t0);
        std::fill(v.begin() + nb * K, v.end(), A(0));
        mk.row(t0 * K, nb * K, m.data());  // the block's rows are consecutive mask elements
        for (int64_t i = 0; i < nb; ++i) {
          masked_row(x + (t0 + i) * p.x_rs, p.x_cs, m.data() + i * K, K, v.data() + i * K);
        }
        for (int64_t q = 0; q < R; ++q) {
          dot_rows(v.data(), a + q * K, K, dots);
          for (int64_t i = 0; i < nb; ++i) out[(t0 + i) * p.out_ld + q] = dots[i];
        }
      }
    });
    return kSuccess;
  });
}

// Token splits in parallel, each with its own dA partial (R x K, cache-resident) and dx rows;
// the partials reduced in split order.
Status grad_cpu(const GradParams& p, void*) {
  const bool need_dA = p.dA != nullptr, need_dx = p.dx != nullptr, need_dots = p.dots != nullptr;
  if (need_dots && !(p.x_dtype == DType::Float32 && p.acc_dtype == DType::Float32 &&
                     avx512_rows<float, float>(p.x_cs, p.K))) {
    return kInvalidValue;  // lora.h: the AVX-512 row work only
  }
  if (p.K == 0 || (p.R == 0 && !need_dots) || (!need_dA && !need_dx && !need_dots)) return kSuccess;
  return dispatch_pass(p.x_dtype, p.acc_dtype, [&](auto x_tag, auto a_tag) {
    using X = decltype(x_tag);
    using A = decltype(a_tag);
    const X* x = static_cast<const X*>(p.x);
    const A* gb = static_cast<const A*>(p.gb);
    const A* a = static_cast<const A*>(p.a);
    X* dx = static_cast<X*>(p.dx);
    const int64_t T = p.T, K = p.K, R = p.R;
    const int64_t splits = grad_splits(T);
    A* dA = static_cast<A*>(p.dA);
    A* part = need_dA ? (splits > 1 ? static_cast<A*>(p.partial) : dA) : nullptr;
    if (need_dA && splits > 1 && part == nullptr) return kInvalidValue;
    const int64_t per = (T + splits - 1) / splits;
    at::parallel_for(0, splits, 1, [&](int64_t s0, int64_t s1) {
      std::vector<A> m(static_cast<size_t>(kRows * K)), v(static_cast<size_t>(kRows * K));
      Multipliers<A> mk(static_cast<A>(p.mask.mult), p.mask.thresh, p.mask.seed, p.mask.offset);
      const bool wide = avx512_rows<X, A>(p.x_cs, K);
#ifdef SLIMTUNE_LORA_AVX512
      const int64_t rows = wide ? avx512::kWideRows : kRows;
#else
      const int64_t rows = kRows;
#endif
      std::vector<A> gq(static_cast<size_t>(R * rows));  // gq[q * rows + i] = gb[t0 + i, q]
      for (int64_t s = s0; s < s1; ++s) {
        A* acc = need_dA ? part + s * R * K : nullptr;
        if (need_dA) std::fill(acc, acc + R * K, A(0));
        const int64_t t_end = std::min(T, (s + 1) * per);
        for (int64_t t0 = s * per; t0 < t_end; t0 += rows) {
          const int64_t nb = std::min<int64_t>(rows, t_end - t0);
          for (int64_t i = 0; i < rows; ++i) {
            for (int64_t q = 0; q < R; ++q) gq[q * rows + i] = i < nb ? gb[(t0 + i) * p.gb_ld + q] : A(0);
          }
#ifdef SLIMTUNE_LORA_AVX512
          if constexpr (std::is_same<X, float>::value && std::is_same<A, float>::value) {
            if (wide) {
              if (need_dots) {  // first: the rows then stay in L1 for grad_rows
                float* out = static_cast<float*>(p.dots) + t0 * p.dots_ld;
                avx512::row_dots<avx512::kWideRows>(x + t0 * p.x_rs, p.x_rs, nb, K, x,
                                                    static_cast<const float*>(p.dots_a), p.dots_R, out, p.dots_ld);
              }
              avx512::grad_rows<avx512::kWideRows>(x + t0 * p.x_rs, p.x_rs, nb, K, R, gq.data(), a,
                                                   mk.keep(t0 * K, nb * K), static_cast<float>(p.mask.mult), acc,
                                                   need_dx ? dx + t0 * K : nullptr, p.dx_accumulate);
              continue;
            }
          }
#endif
          mk.row(t0 * K, nb * K, m.data());  // the block's rows are consecutive mask elements
          if (need_dA) {
            for (int64_t i = 0; i < kRows; ++i) {
              A* vi = v.data() + i * K;
              if (i < nb) {
                masked_row(x + (t0 + i) * p.x_rs, p.x_cs, m.data() + i * K, K, vi);
              } else {
                std::fill(vi, vi + K, A(0));
              }
            }
            for (int64_t q = 0; q < R; ++q) gather_rows(gq.data() + q * kRows, v.data(), K, acc + q * K);
          }
          if (need_dx) {
            std::fill(v.begin(), v.end(), A(0));
            for (int64_t q = 0; q < R; ++q) scatter_rows(gq.data() + q * kRows, a + q * K, K, v.data());
            for (int64_t i = 0; i < nb; ++i) {
              X* d = dx + (t0 + i) * K;
              const A* vi = v.data() + i * K;
              const A* mi = m.data() + i * K;
              if (p.dx_accumulate) {
                for (int64_t j = 0; j < K; ++j) d[j] = static_cast<X>(static_cast<A>(d[j]) + vi[j] * mi[j]);
              } else {
                for (int64_t j = 0; j < K; ++j) d[j] = static_cast<X>(vi[j] * mi[j]);
              }
            }
          }
        }
      }
    });
    if (need_dA && splits > 1) {
      at::parallel_for(0, R * K, 4096, [&](int64_t i0, int64_t i1) {
        for (int64_t i = i0; i < i1; ++i) {
          A sum = part[i];
          for (int64_t s = 1; s < splits; ++s) sum += part[s * R * K + i];
          dA[i] = sum;
        }
      });
    }
    return kSuccess;
  });
}

}  // namespace lora
}  // namespace slimtune
