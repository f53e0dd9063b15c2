// Philox4x32-10 counter-based RNG (Salmon et al., SC'11) and the LoRA dropout mask built on
// it. Host C++ and CUDA device code: the CPU and CUDA kernels both draw from here, so one
// (seed, offset, element index) gives the same keep/drop bit on every device.
#pragma once
#include <cstdint>

#include "common/types.h"

namespace slimtune {
namespace philox {

constexpr uint32_t kM0 = 0xD2511F53u, kM1 = 0xCD9E8D57u;  // round multipliers
constexpr uint32_t kW0 = 0x9E3779B9u, kW1 = 0xBB67AE85u;  // key schedule (Weyl) increments

struct U32x4 {
  uint32_t v[4];
};

// One round on counter (c0..c3) under key (k0, k1). Written on scalars so the CPU kernels can
// run it over arrays of counters side by side (vectorized) and stay bit-identical.
SLIMTUNE_HD void round(uint32_t& c0, uint32_t& c1, uint32_t& c2, uint32_t& c3, uint32_t k0, uint32_t k1) {
  const uint64_t p0 = static_cast<uint64_t>(kM0) * c0;
  const uint64_t p1 = static_cast<uint64_t>(kM1) * c2;
  const uint32_t n0 = static_cast<uint32_t>(p1 >> 32) ^ c1 ^ k0;
  const uint32_t n2 = static_cast<uint32_t>(p0 >> 32) ^ c3 ^ k1;
  c0 = n0;
  c1 = static_cast<uint32_t>(p1);
  c2 = n2;
  c3 = static_cast<uint32_t>(p0);
}

SLIMTUNE_HD U32x4 philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0, uint32_t k1) {
#ifdef __CUDACC__
#pragma unroll
#endif
  for (int r = 0; r < 10; ++r) {
    round(c0, c1, c2, c3, k0, k1);
    k0 += kW0;
    k1 += kW1;
  }
  return U32x4{{c0, c1, c2, c3}};
}

// Dropout mask layout: element e (row-major index into the 2-D (tokens, features) input)
// takes 16 bits of Philox block (offset + e / 8): lane e % 8, word (e % 8) / 2, low half
// for even e. It is kept when those 16 bits are >= threshold(p) = round(p * 65536), so p
// is resolved to 1/65536 (the keep scale stays 1 / (1 - p)).
constexpr int kElemsPerBlock = 8;
// Third counter word of every mask block: separates the mask stream from other uses of a seed.
constexpr uint32_t kMaskStream = 0x4C6F5241u;  // "LoRA"

inline uint32_t threshold(double p) {
  const double t = p * 65536.0 + 0.5;
  return t >= 65536.0 ? 65536u : static_cast<uint32_t>(t);
}

// The counter (c0, c1, c2, c3) of mask block `block_index`; the key is (seed lo, seed hi).
SLIMTUNE_HD void mask_counter(uint64_t offset, uint64_t block_index, uint32_t& c0, uint32_t& c1, uint32_t& c2,
                              uint32_t& c3) {
  const uint64_t c = offset + block_index;
  c0 = static_cast<uint32_t>(c);
  c1 = static_cast<uint32_t>(c >> 32);
  c2 = kMaskStream;
  c3 = 0u;
}

SLIMTUNE_HD U32x4 block(uint64_t seed, uint64_t offset, uint64_t block_index) {
  uint32_t c0, c1, c2, c3;
  mask_counter(offset, block_index, c0, c1, c2, c3);
  return philox4x32_10(c0, c1, c2, c3, static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
}

// 8 keep bits (bit i for element 8 * block_index + i) of one Philox block's output words.
SLIMTUNE_HD uint32_t keep_bits(uint32_t w0, uint32_t w1, uint32_t w2, uint32_t w3, uint32_t thresh) {
  const uint32_t w[4] = {w0, w1, w2, w3};
  uint32_t bits = 0;
  for (int i = 0; i < kElemsPerBlock; ++i) {
    const uint32_t u = (i & 1) ? (w[i >> 1] >> 16) : (w[i >> 1] & 0xFFFFu);
    bits |= static_cast<uint32_t>(u >= thresh) << i;
  }
  return bits;
}

SLIMTUNE_HD uint32_t keep_bits(const U32x4& r, uint32_t thresh) {
  return keep_bits(r.v[0], r.v[1], r.v[2], r.v[3], thresh);
}

}  // namespace philox
}  // namespace slimtune
