// Philox4x32-10 counter-based RNG (Salmon et al., SC'11), usable from host C++ and CUDA
// device code, and the LoRA dropout mask built on it. No torch or CUDA headers: g++ and
// nvcc both compile this file, so one (seed, offset, element index) gives the same
// keep/drop bit on the CPU and on the GPU.
#pragma once
#include <cstdint>

#ifdef __CUDACC__
#define SLIMTUNE_HD __host__ __device__ __forceinline__
#else
#define SLIMTUNE_HD inline
#endif

namespace slimtune {
namespace philox {

struct U32x4 {
  uint32_t v[4];
};

SLIMTUNE_HD uint32_t mulhilo(uint32_t a, uint32_t b, uint32_t* hi) {
  const uint64_t p = static_cast<uint64_t>(a) * static_cast<uint64_t>(b);
  *hi = static_cast<uint32_t>(p >> 32);
  return static_cast<uint32_t>(p);
}

// Ten rounds on counter (c0..c3) under key (k0, k1).
SLIMTUNE_HD U32x4 philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0, uint32_t k1) {
  constexpr uint32_t M0 = 0xD2511F53u, M1 = 0xCD9E8D57u, W0 = 0x9E3779B9u, W1 = 0xBB67AE85u;
#ifdef __CUDACC__
#pragma unroll
#endif
  for (int round = 0; round < 10; ++round) {
    uint32_t hi0, hi1;
    const uint32_t lo0 = mulhilo(M0, c0, &hi0);
    const uint32_t lo1 = mulhilo(M1, c2, &hi1);
    const uint32_t n0 = hi1 ^ c1 ^ k0, n2 = hi0 ^ c3 ^ k1;
    c0 = n0;
    c1 = lo1;
    c2 = n2;
    c3 = lo0;
    k0 += W0;
    k1 += W1;
  }
  return U32x4{{c0, c1, c2, c3}};
}

// Dropout mask layout: element e (row-major index into the 2-D (tokens, features) input)
// takes 16 bits of Philox block (offset + e / 8): lane e % 8, word (e % 8) / 2, low half
// for even e. It is kept when those 16 bits are >= threshold(p) = round(p * 65536), so p
// is resolved to 1/65536 (the keep scale stays 1 / (1 - p)).
constexpr int kElemsPerBlock = 8;

inline uint32_t threshold(double p) {
  const double t = p * 65536.0 + 0.5;
  return t >= 65536.0 ? 65536u : static_cast<uint32_t>(t);
}

SLIMTUNE_HD U32x4 block(uint64_t seed, uint64_t offset, uint64_t block_index) {
  const uint64_t c = offset + block_index;
  return philox4x32_10(static_cast<uint32_t>(c), static_cast<uint32_t>(c >> 32), 0x4C6F5241u /* "LoRA" */, 0u,
                       static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
}

// 8 keep bits (bit i for element 8 * block_index + i) of one Philox block.
SLIMTUNE_HD uint32_t keep_bits(const U32x4& r, uint32_t thresh) {
  uint32_t bits = 0;
  for (int i = 0; i < kElemsPerBlock; ++i) {
    const uint32_t word = r.v[i >> 1];
    const uint32_t u = (i & 1) ? (word >> 16) : (word & 0xFFFFu);
    bits |= static_cast<uint32_t>(u >= thresh) << i;
  }
  return bits;
}

SLIMTUNE_HD bool keep(uint64_t seed, uint64_t offset, uint64_t e, uint32_t thresh) {
  return (keep_bits(block(seed, offset, e / kElemsPerBlock), thresh) >> (e % kElemsPerBlock)) & 1u;
}

}  // namespace philox
}  // namespace slimtune
