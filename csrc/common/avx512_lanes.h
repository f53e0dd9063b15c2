// float32 <-> bf16/fp16 in 16 AVX-512 lanes, the 16-bit values in the low halves of 32-bit lanes:
// widened exactly, and rounded once as c10's conversions round (to nearest, ties to even; bf16 NaN
// as 0x7FC0, fp16 NaN as sign | 0x7E00), so a vector path stores the bits its portable twin stores.
// Callers check cpu_avx512() first.
#pragma once

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>

namespace slimtune {
namespace avx512_lanes {

#define SLIMTUNE_LANES_FN __attribute__((target("avx512f"))) inline

SLIMTUNE_LANES_FN __m512 widen_bf16(__m256i h) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

SLIMTUNE_LANES_FN __m512 widen_half(__m256i h) { return _mm512_cvtph_ps(h); }

SLIMTUNE_LANES_FN __m512i round_bf16(__m512 v) {
  const __m512i u = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  const __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff))), 16);
  // A NaN's payload would carry into the exponent or the sign.
  return _mm512_mask_blend_epi32(_mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), r, _mm512_set1_epi32(0x7fc0));
}

SLIMTUNE_LANES_FN __m512i round_half(__m512 v) {
  const __m512i r = _mm512_cvtepu16_epi32(_mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  // vcvtps2ph keeps a NaN's payload; c10 keeps only its sign.
  const __m512i nan = _mm512_or_si512(
      _mm512_and_si512(_mm512_srli_epi32(_mm512_castps_si512(v), 16), _mm512_set1_epi32(0x8000)),
      _mm512_set1_epi32(0x7e00));
  return _mm512_mask_blend_epi32(_mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), r, nan);
}

#undef SLIMTUNE_LANES_FN

}  // namespace avx512_lanes
}  // namespace slimtune
#endif
