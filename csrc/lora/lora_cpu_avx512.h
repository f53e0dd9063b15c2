// AVX-512 forms of the float32 row work of lora_cpu.cpp's passes with dropout: the keep bits
// (common/philox_cpu) are the vector mask registers themselves, so no per-element multipliers
// are expanded and no masked copy of x is made for the gradient. Rows start on a mask byte
// (K % 8 == 0). Included by lora_cpu.cpp only; callers check avx512_usable() first.
#pragma once

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define SLIMTUNE_LORA_AVX512 1
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

namespace slimtune {
namespace lora {
namespace avx512 {

#define SLIMTUNE_AVX512_FN __attribute__((target("avx512f")))

inline bool avx512_usable() {
  static const bool ok = __builtin_cpu_supports("avx512f");
  return ok;
}

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

// out[i] = v_i . a for the N rows v_i = v + i * K: N independent FMA chains, N + 1 loads per
// N FMAs. (Two rows of a at a time, 2 N chains, measured slower.)
template <int N>
SLIMTUNE_AVX512_FN inline void dots(const float* v, const float* a, int64_t K, float* out) {
  __m512 s[N];
  for (int i = 0; i < N; ++i) s[i] = _mm512_setzero_ps();
  int64_t j = 0;
  for (; j + 16 <= K; j += 16) {
    const __m512 aj = _mm512_loadu_ps(a + j);
    for (int i = 0; i < N; ++i) s[i] = _mm512_fmadd_ps(_mm512_loadu_ps(v + i * K + j), aj, s[i]);
  }
  if (j < K) {
    const __mmask16 k = first_n(K - j);
    const __m512 aj = _mm512_maskz_loadu_ps(k, a + j);
    for (int i = 0; i < N; ++i) s[i] = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(k, v + i * K + j), aj, s[i]);
  }
  for (int i = 0; i < N; ++i) out[i] = _mm512_reduce_add_ps(s[i]);
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
