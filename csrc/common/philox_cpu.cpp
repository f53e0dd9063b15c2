// Philox keep bits on the CPU: blocks run side by side (structure of arrays) so the 32x32->64
// multiplies of philox::round vectorize. With AVX-512 the rounds are written with intrinsics:
// compiled from plain C++, each 32x32->64 product became a full 64x64 multiply (three vpmuludq
// and shifts); vpmuludq on the even and the shifted odd lanes is all a round needs. Elsewhere
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

constexpr int kVecs = 4;  // 64 blocks per step: independent chains hide the multiplies' latency

// hi, lo = the halves of the 32x32->64 products a * m, lane by lane (m broadcast).
SLIMTUNE_AVX512 void mulhilo(__m512i a, __m512i m, __m512i& hi, __m512i& lo) {
  const __m512i even = _mm512_mul_epu32(a, m);
  const __m512i odd = _mm512_mul_epu32(_mm512_srli_epi64(a, 32), m);
  hi = _mm512_mask_blend_epi32(0xAAAA, _mm512_srli_epi64(even, 32), odd);
  lo = _mm512_mask_blend_epi32(0xAAAA, even, _mm512_slli_epi64(odd, 32));
}

// The low and high words of the 64-bit counters c .. c + 15.
SLIMTUNE_AVX512 void counters(uint64_t c, __m512i& c0, __m512i& c1) {
  const __m512i iota = _mm512_set_epi64(7, 6, 5, 4, 3, 2, 1, 0);
  const __m512i a = _mm512_add_epi64(_mm512_set1_epi64(static_cast<long long>(c)), iota);
  const __m512i b = _mm512_add_epi64(a, _mm512_set1_epi64(8));
  c0 = _mm512_inserti64x4(_mm512_castsi256_si512(_mm512_cvtepi64_epi32(a)), _mm512_cvtepi64_epi32(b), 1);
  c1 = _mm512_inserti64x4(_mm512_castsi256_si512(_mm512_cvtepi64_epi32(_mm512_srli_epi64(a, 32))),
                          _mm512_cvtepi64_epi32(_mm512_srli_epi64(b, 32)), 1);
}

__attribute__((target("avx512f"))) void keep_bytes_avx512(uint64_t seed, uint32_t stream, uint64_t first,
                                                          int64_t nblk, uint32_t thresh, uint8_t* keep) {
  const __m512i m0 = _mm512_set1_epi32(static_cast<int>(kM0)), m1 = _mm512_set1_epi32(static_cast<int>(kM1));
  const __m512i t = _mm512_set1_epi32(static_cast<int>(thresh)), low = _mm512_set1_epi32(0xFFFF);
  const uint32_t key0 = static_cast<uint32_t>(seed), key1 = static_cast<uint32_t>(seed >> 32);
  for (int64_t base = 0; base < nblk; base += 16 * kVecs) {
    __m512i c0[kVecs], c1[kVecs], c2[kVecs], c3[kVecs];
    for (int v = 0; v < kVecs; ++v) {
      counters(first + static_cast<uint64_t>(base + 16 * v), c0[v], c1[v]);
      c2[v] = _mm512_set1_epi32(static_cast<int>(stream));
      c3[v] = _mm512_setzero_si512();
    }
    uint32_t k0 = key0, k1 = key1;
    for (int r = 0; r < 10; ++r) {
      const __m512i k0v = _mm512_set1_epi32(static_cast<int>(k0)), k1v = _mm512_set1_epi32(static_cast<int>(k1));
      for (int v = 0; v < kVecs; ++v) {
        __m512i hi0, lo0, hi1, lo1;
        mulhilo(c0[v], m0, hi0, lo0);
        mulhilo(c2[v], m1, hi1, lo1);
        c0[v] = _mm512_ternarylogic_epi32(hi1, c1[v], k0v, 0x96);  // three-way xor
        c2[v] = _mm512_ternarylogic_epi32(hi0, c3[v], k1v, 0x96);
        c1[v] = lo1;
        c3[v] = lo0;
      }
      k0 += kW0;
      k1 += kW1;
    }
    for (int v = 0; v < kVecs; ++v) {
      const int64_t b0 = base + 16 * v;
      if (b0 >= nblk) break;
      // Bit 2i (2i + 1) of a block's byte: the low (high) half of word i against the threshold.
      const __m512i w[4] = {c0[v], c1[v], c2[v], c3[v]};
      __m512i bits = _mm512_setzero_si512();
      for (int i = 0; i < 4; ++i) {
        const __mmask16 lo_keep = _mm512_cmpge_epu32_mask(_mm512_and_si512(w[i], low), t);
        const __mmask16 hi_keep = _mm512_cmpge_epu32_mask(_mm512_srli_epi32(w[i], 16), t);
        bits = _mm512_mask_or_epi32(bits, lo_keep, bits, _mm512_set1_epi32(1 << (2 * i)));
        bits = _mm512_mask_or_epi32(bits, hi_keep, bits, _mm512_set1_epi32(2 << (2 * i)));
      }
      const int64_t n = std::min<int64_t>(16, nblk - b0);
      _mm512_mask_cvtepi32_storeu_epi8(keep + b0, static_cast<__mmask16>((1u << n) - 1u), bits);
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
