// Philox keep bits on the CPU: blocks run side by side (structure of arrays) so the 32x32->64
// multiplies of philox::round vectorize; compiled for wide vector units too, the loader picks
// (GCC ifunc clones; other compilers get one copy).
#include "common/philox_cpu.h"

#include <algorithm>

#include "common/philox.h"

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define SLIMTUNE_PHILOX_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define SLIMTUNE_PHILOX_CLONES
#endif

namespace slimtune {
namespace philox {

namespace {
constexpr int kLanes = 32;  // two AVX-512 vectors of counters: independent chains hide latency
}  // namespace

SLIMTUNE_PHILOX_CLONES void keep_bytes(uint64_t seed, uint32_t stream, uint64_t first, int64_t nblk,
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

}  // namespace philox
}  // namespace slimtune
