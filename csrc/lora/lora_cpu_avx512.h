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

// out[i] = v_i . a for the 4 rows v_i = v + i * K: two accumulators per row, so eight
// independent FMA chains.
SLIMTUNE_AVX512_FN inline void dot4(const float* v, const float* a, int64_t K, float* out) {
  __m512 s[4][2];
  for (int i = 0; i < 4; ++i) s[i][0] = s[i][1] = _mm512_setzero_ps();
  int64_t j = 0;
  for (; j + 32 <= K; j += 32) {
    const __m512 a0 = _mm512_loadu_ps(a + j), a1 = _mm512_loadu_ps(a + j + 16);
    for (int i = 0; i < 4; ++i) {
      s[i][0] = _mm512_fmadd_ps(_mm512_loadu_ps(v + i * K + j), a0, s[i][0]);
      s[i][1] = _mm512_fmadd_ps(_mm512_loadu_ps(v + i * K + j + 16), a1, s[i][1]);
    }
  }
  for (; j < K; j += 16) {
    const __mmask16 k = first_n(std::min<int64_t>(16, K - j));
    const __m512 a0 = _mm512_maskz_loadu_ps(k, a + j);
    for (int i = 0; i < 4; ++i) s[i][0] = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(k, v + i * K + j), a0, s[i][0]);
  }
  for (int i = 0; i < 4; ++i) out[i] = _mm512_reduce_add_ps(_mm512_add_ps(s[i][0], s[i][1]));
}

// The gradient pass on 4 rows (nb of them real; gq[q * 4 + i] = gb[t0 + i, q], 0 past nb):
// acc[q * K + c] += sum_i gq[q * 4 + i] * keep * mult * x_i[c] (when acc is set) and
// dx_i[c] (+)= keep * mult * sum_q gq[q * 4 + i] * a[q * K + c] (when dx is set). Column chunks
// outermost: the chunk of the 4 masked x rows stays in registers across every q.
SLIMTUNE_AVX512_FN inline void grad4(const float* x, int64_t rs, int64_t nb, int64_t K, int64_t R, const float* gq,
                                     const float* a, const uint8_t* bits, float mult, float* acc, float* dx,
                                     bool accumulate) {
  const __m512 m = _mm512_set1_ps(mult);
  for (int64_t j = 0; j < K; j += 16) {
    const int64_t n = std::min<int64_t>(16, K - j);
    const __mmask16 cols = first_n(n);
    __mmask16 keep[4];
    for (int i = 0; i < 4; ++i) keep[i] = i < nb ? keep_mask(bits, i * K + j, n) : 0;
    if (acc != nullptr) {
      __m512 v[4];
      for (int i = 0; i < 4; ++i) {
        v[i] = i < nb ? _mm512_maskz_mul_ps(keep[i], _mm512_maskz_loadu_ps(cols, x + i * rs + j), m)
                      : _mm512_setzero_ps();
      }
      for (int64_t q = 0; q < R; ++q) {
        const float* g = gq + q * 4;
        __m512 t = _mm512_mul_ps(_mm512_set1_ps(g[0]), v[0]);
        t = _mm512_fmadd_ps(_mm512_set1_ps(g[1]), v[1], t);
        t = _mm512_fmadd_ps(_mm512_set1_ps(g[2]), v[2], t);
        t = _mm512_fmadd_ps(_mm512_set1_ps(g[3]), v[3], t);
        float* y = acc + q * K + j;
        _mm512_mask_storeu_ps(y, cols, _mm512_add_ps(_mm512_maskz_loadu_ps(cols, y), t));
      }
    }
    if (dx != nullptr) {
      __m512 s[4];
      for (int i = 0; i < 4; ++i) s[i] = _mm512_setzero_ps();
      for (int64_t q = 0; q < R; ++q) {
        const __m512 aq = _mm512_maskz_loadu_ps(cols, a + q * K + j);
        for (int i = 0; i < 4; ++i) s[i] = _mm512_fmadd_ps(_mm512_set1_ps(gq[q * 4 + i]), aq, s[i]);
      }
      for (int64_t i = 0; i < nb; ++i) {
        float* d = dx + i * K + j;
        __m512 r = _mm512_maskz_mul_ps(keep[i], s[i], m);
        if (accumulate) r = _mm512_add_ps(_mm512_maskz_loadu_ps(cols, d), r);
        _mm512_mask_storeu_ps(d, cols, r);
      }
    }
  }
}

#undef SLIMTUNE_AVX512_FN

}  // namespace avx512
}  // namespace lora
}  // namespace slimtune
#endif
