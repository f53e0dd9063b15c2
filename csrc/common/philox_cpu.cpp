// Philox keep bits on the CPU: blocks run side by side (structure of arrays) so the 32x32->64
// multiplies of philox::round vectorize. With AVX-512 the rounds are written with intrinsics:
// compiled from plain C++, each 32x32->64 product became a full 64x64 multiply (three vpmuludq
// and shifts); one vpmuludq per product is all a round needs. Elsewhere
// the plain loop, compiled for wide vector units too (GCC ifunc clones; other compilers get one
// copy). Both give the bits of philox::keep_bits, bit for bit.
#include "common/philox_cpu.h"

#include <algorithm>

#include "common/philox.h"

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define SLIMTUNE_PHILOX_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#define SLIMTUNE_PHILOX_AVX512 1
#include <immintrin.h>
#else
#define SLIMTUNE_PHILOX_CLONES
#endif

namespace slimtune {
namespace philox {

namespace {
constexpr int kLanes = 32;  // two AVX-512 vectors of counters: independent chains hide latency

SLIMTUNE_PHILOX_CLONES void keep_bytes_portable(uint64_t seed, uint32_t stream, uint64_t first, int64_t nblk,
                                                uint32_t thresh, uint8_t* keep) {
  const uint32_t key0 = static_cast<uint32_t>(seed), key1 = static_cast<uint32_t>(seed >> 32);
  for (int64_t base = 0; base < nblk; base += kLanes) {
    uint32_t c0[kLanes], c1[kLanes], c2[kLanes], c3[kLanes];
    for (int l = 0; l < kLanes; ++l) {
      const uint64_t c = first + static_cast<uint64_t>(base + l);
      c0[l] = static_cast<uint32_t>(c);
      c1[l] = static_cast<uint32_t>(c >> 32);
      c2[l] = stream;
      c3[l] = 0u;
    }
    uint32_t k0 = key0, k1 = key1;
    for (int r = 0; r < 10; ++r) {
      for (int l = 0; l < kLanes; ++l) round(c0[l], c1[l], c2[l], c3[l], k0, k1);
      k0 += kW0;
      k1 += kW1;
    }
    uint8_t bits[kLanes];
    for (int l = 0; l < kLanes; ++l) bits[l] = static_cast<uint8_t>(keep_bits(c0[l], c1[l], c2[l], c3[l], thresh));
    const int n = static_cast<int>(std::min<int64_t>(kLanes, nblk - base));
    for (int l = 0; l < n; ++l) keep[base + l] = bits[l];
  }
}

#ifdef SLIMTUNE_PHILOX_AVX512
#define SLIMTUNE_AVX512 __attribute__((target("avx512f"), always_inline)) inline

// Each 32-bit word of a block sits in the low half of a 64-bit lane, 8 blocks per vector:
// vpmuludq then gives the whole product, low word in place, high word one shift away, and
// the high halves may hold anything (vpmuludq and the final pack ignore them).
constexpr int kVecs = 8;  // 64 blocks per step: independent chains hide the multiplies' latency

// The 16 keep bytes of blocks held in a (first 8) and b (next 8), words w0..w3.
SLIMTUNE_AVX512 __m512i keep16(const __m512i* a, const __m512i* b, __m512i t) {
  const __m512i low = _mm512_set1_epi32(0xFFFF);
  __m512i bits = _mm512_setzero_si512();
  for (int i = 0; i < 4; ++i) {
    const __m512i w =
        _mm512_inserti64x4(_mm512_castsi256_si512(_mm512_cvtepi64_epi32(a[i])), _mm512_cvtepi64_epi32(b[i]), 1);
    // Bit 2i (2i + 1) of a block's byte: the low (high) half of word i against the threshold.
    const __mmask16 lo_keep = _mm512_cmpge_epu32_mask(_mm512_and_si512(w, low), t);
    const __mmask16 hi_keep = _mm512_cmpge_epu32_mask(_mm512_srli_epi32(w, 16), t);
    bits = _mm512_mask_or_epi32(bits, lo_keep, bits, _mm512_set1_epi32(1 << (2 * i)));
    bits = _mm512_mask_or_epi32(bits, hi_keep, bits, _mm512_set1_epi32(2 << (2 * i)));
  }
  return bits;
}

__attribute__((target("avx512f"))) void keep_bytes_avx512(uint64_t seed, uint32_t stream, uint64_t first,
                                                          int64_t nblk, uint32_t thresh, uint8_t* keep) {
  const __m512i m0 = _mm512_set1_epi64(kM0), m1 = _mm512_set1_epi64(kM1);
  const __m512i t = _mm512_set1_epi32(static_cast<int>(thresh));
  const __m512i iota = _mm512_set_epi64(7, 6, 5, 4, 3, 2, 1, 0);
  const uint32_t key0 = static_cast<uint32_t>(seed), key1 = static_cast<uint32_t>(seed >> 32);
  for (int64_t base = 0; base < nblk; base += 8 * kVecs) {
    __m512i w[kVecs][4];
    for (int v = 0; v < kVecs; ++v) {
      const uint64_t c = first + static_cast<uint64_t>(base + 8 * v);
      w[v][0] = _mm512_add_epi64(_mm512_set1_epi64(static_cast<long long>(c)), iota);  // 64-bit counters
      w[v][1] = _mm512_srli_epi64(w[v][0], 32);
      w[v][2] = _mm512_set1_epi64(stream);
      w[v][3] = _mm512_setzero_si512();
    }
    uint32_t k0 = key0, k1 = key1;
    for (int r = 0; r < 10; ++r) {
      const __m512i k0v = _mm512_set1_epi64(k0), k1v = _mm512_set1_epi64(k1);
      for (int v = 0; v < kVecs; ++v) {
        const __m512i p0 = _mm512_mul_epu32(w[v][0], m0), p1 = _mm512_mul_epu32(w[v][2], m1);
        w[v][0] = _mm512_ternarylogic_epi64(_mm512_srli_epi64(p1, 32), w[v][1], k0v, 0x96);  // three-way xor
        w[v][2] = _mm512_ternarylogic_epi64(_mm512_srli_epi64(p0, 32), w[v][3], k1v, 0x96);
        w[v][1] = p1;
        w[v][3] = p0;
      }
      k0 += kW0;
      k1 += kW1;
    }
    for (int v = 0; v < kVecs; v += 2) {
      const int64_t b0 = base + 8 * v;
      if (b0 >= nblk) break;
      const int64_t n = std::min<int64_t>(16, nblk - b0);
      _mm512_mask_cvtepi32_storeu_epi8(keep + b0, static_cast<__mmask16>((1u << n) - 1u), keep16(w[v], w[v + 1], t));
    }
  }
}
#undef SLIMTUNE_AVX512
#endif
}  // namespace

void keep_bytes(uint64_t seed, uint32_t stream, uint64_t first, int64_t nblk, uint32_t thresh, uint8_t* keep) {
#ifdef SLIMTUNE_PHILOX_AVX512
  static const bool avx512 = __builtin_cpu_supports("avx512f");
  if (avx512) {
    keep_bytes_avx512(seed, stream, first, nblk, thresh, keep);
    return;
  }
#endif
  keep_bytes_portable(seed, stream, first, nblk, thresh, keep);
}

}  // namespace philox
}  // namespace slimtune
