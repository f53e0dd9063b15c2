// CPU kernels of the memsave family (at::parallel_for over raw pointers).
#include <ATen/Parallel.h>

#include <atomic>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "common/acc.h"
#include "common/cpu_dispatch.h"
#include "common/philox.h"
#include "memsave/memsave.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define SLIMTUNE_MEMSAVE_AVX512 1
#endif

namespace slimtune {
namespace memsave {
namespace {

// Unsigned integer of a float type's width: ReLU only looks at sign, magnitude and NaN-ness,
// so it runs on the bits (one code path for all four dtypes, NaN payloads passed through).
template <typename T>
using Bits = std::conditional_t<sizeof(T) == 8, uint64_t, std::conditional_t<sizeof(T) == 4, uint32_t, uint16_t>>;

// The bits of +infinity: a magnitude above it is a NaN.
template <typename T>
constexpr Bits<T> kInfBits = static_cast<Bits<T>>(std::is_same_v<T, double>          ? 0x7ff0000000000000ull
                                                  : std::is_same_v<T, float>         ? 0x7f800000ull
                                                  : std::is_same_v<T, c10::BFloat16> ? 0x7f80ull
                                                                                     : 0x7c00ull);

template <typename U>
constexpr U kSign = U{1} << (sizeof(U) * 8 - 1);

// passes: !(v <= 0), where the gradient flows (NaN included, as threshold_backward does).
// kept: !(v < 0), what relu(v) keeps bit for bit (-0.0 and NaN stay, as torch.relu gives).
template <typename T>
inline bool passes(Bits<T> u) {
  const Bits<T> mag = u & ~kSign<Bits<T>>;
  return mag > kInfBits<T> || (!(u & kSign<Bits<T>>) && mag != 0);
}
template <typename T>
inline bool kept(Bits<T> u) {
  const Bits<T> mag = u & ~kSign<Bits<T>>;
  return !(u & kSign<Bits<T>>) || mag == 0 || mag > kInfBits<T>;
}

// Scalar bytes [begin, end) of the mask over n elements; `out` (may alias x) gets relu(x) when given.
template <typename T>
void relu_bytes(const Bits<T>* x, Bits<T>* out, uint8_t* m, int64_t n, int64_t begin, int64_t end) {
  using U = Bits<T>;
  for (int64_t b = begin; b < end; ++b) {
    const int64_t base = b * 8;
    const int lim = n - base < 8 ? static_cast<int>(n - base) : 8;
    uint8_t byte = 0;
    for (int j = 0; j < lim; ++j) {
      const U u = x[base + j];
      byte |= static_cast<uint8_t>(passes<T>(u)) << j;
      if (out != nullptr) out[base + j] = u & static_cast<U>(-static_cast<U>(kept<T>(u)));
    }
    m[b] = byte;
  }
}

template <typename U>
void relu_backward_bytes(const U* g, const uint8_t* m, U* out, int64_t n, int64_t begin, int64_t end) {
  for (int64_t b = begin; b < end; ++b) {
    const int64_t base = b * 8;
    const int lim = n - base < 8 ? static_cast<int>(n - base) : 8;
    const unsigned byte = m[b];
    for (int j = 0; j < lim; ++j) out[base + j] = g[base + j] & static_cast<U>(-static_cast<U>((byte >> j) & 1u));
  }
}

#ifdef SLIMTUNE_MEMSAVE_AVX512
#define SLIMTUNE_AVX512 __attribute__((target("avx512f,avx512bw")))

bool has_avx512() {
  static const bool ok = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw");
  return ok;
}

// One 64-byte vector of lanes of width sizeof(U): the compares give the mask bits directly,
// one k-register per vector, stored as 8/16/32 bits (whole mask bytes).
template <typename U>
struct Lanes;
template <>
struct Lanes<uint16_t> {
  using K = __mmask32;
  SLIMTUNE_AVX512 static __m512i set1(uint16_t v) { return _mm512_set1_epi16(static_cast<short>(v)); }
  SLIMTUNE_AVX512 static K gt(__m512i a, __m512i b) { return _mm512_cmpgt_epi16_mask(a, b); }
  SLIMTUNE_AVX512 static K eq(__m512i a, __m512i b) { return _mm512_cmpeq_epi16_mask(a, b); }
  SLIMTUNE_AVX512 static __m512i keep(K k, __m512i v) { return _mm512_maskz_mov_epi16(k, v); }
};
template <>
struct Lanes<uint32_t> {
  using K = __mmask16;
  SLIMTUNE_AVX512 static __m512i set1(uint32_t v) { return _mm512_set1_epi32(static_cast<int>(v)); }
  SLIMTUNE_AVX512 static K gt(__m512i a, __m512i b) { return _mm512_cmpgt_epi32_mask(a, b); }
  SLIMTUNE_AVX512 static K eq(__m512i a, __m512i b) { return _mm512_cmpeq_epi32_mask(a, b); }
  SLIMTUNE_AVX512 static __m512i keep(K k, __m512i v) { return _mm512_maskz_mov_epi32(k, v); }
};
template <>
struct Lanes<uint64_t> {
  using K = __mmask8;
  SLIMTUNE_AVX512 static __m512i set1(uint64_t v) { return _mm512_set1_epi64(static_cast<long long>(v)); }
  SLIMTUNE_AVX512 static K gt(__m512i a, __m512i b) { return _mm512_cmpgt_epi64_mask(a, b); }
  SLIMTUNE_AVX512 static K eq(__m512i a, __m512i b) { return _mm512_cmpeq_epi64_mask(a, b); }
  SLIMTUNE_AVX512 static __m512i keep(K k, __m512i v) { return _mm512_maskz_mov_epi64(k, v); }
};

// Elements [first, first + count) (count a multiple of the lane count, first of 8); returns
// nothing, the scalar loop takes what is left.
template <typename T>
SLIMTUNE_AVX512 void relu_vec(const Bits<T>* x, Bits<T>* out, uint8_t* m, int64_t first, int64_t count) {
  using U = Bits<T>;
  using L = Lanes<U>;
  constexpr int kLanes = 64 / sizeof(U);
  const __m512i zero = _mm512_setzero_si512(), mag_mask = L::set1(static_cast<U>(~kSign<U>)),
                inf = L::set1(kInfBits<T>);
  for (int64_t i = first; i < first + count; i += kLanes) {
    const __m512i v = _mm512_loadu_si512(x + i);
    const __m512i mag = _mm512_and_si512(v, mag_mask);
    const typename L::K nan = L::gt(mag, inf);
    // Signed compares on the bits: v > 0 as an integer is a positive non-zero number (or +NaN).
    const typename L::K pass = L::gt(v, zero) | nan;
    if (out != nullptr) {
      // Dropped: negative (sign set, integer < 0) with a non-zero magnitude, not NaN.
      const typename L::K neg = L::gt(zero, v) & ~L::eq(mag, zero) & ~nan;
      _mm512_storeu_si512(out + i, L::keep(static_cast<typename L::K>(~neg), v));
    }
    std::memcpy(m + i / 8, &pass, kLanes / 8);
  }
}

template <typename U>
SLIMTUNE_AVX512 void relu_backward_vec(const U* g, const uint8_t* m, U* out, int64_t first, int64_t count) {
  using L = Lanes<U>;
  constexpr int kLanes = 64 / sizeof(U);
  for (int64_t i = first; i < first + count; i += kLanes) {
    typename L::K k;
    std::memcpy(&k, m + i / 8, kLanes / 8);
    _mm512_storeu_si512(out + i, L::keep(k, _mm512_loadu_si512(g + i)));
  }
}
#endif

// The elements of mask bytes [begin, end) that whole vectors cover (0 without AVX-512).
template <typename U>
int64_t vector_elements(int64_t n, int64_t begin, int64_t end) {
#ifdef SLIMTUNE_MEMSAVE_AVX512
  if (!has_avx512()) return 0;
  constexpr int64_t kLanes = 64 / sizeof(U);
  const int64_t last = end * 8 < n ? end * 8 : n;
  return (last - begin * 8) / kLanes * kLanes;
#else
  (void)n, (void)begin, (void)end;
  return 0;
#endif
}

}  // namespace

Status relu_cpu(const ReluParams& p, void*) {
  if (p.n == 0) return kSuccess;
  return dispatch_cpu_float(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    using U = Bits<T>;
    const U* x = static_cast<const U*>(p.x);
    U* o = static_cast<U*>(p.out);
    uint8_t* m = p.mask;
    const int64_t n = p.n;
    // Chunks of whole bytes: no two tasks write the same mask byte.
    at::parallel_for(0, (n + 7) / 8, 4096, [&](int64_t begin, int64_t end) {
      const int64_t vec = vector_elements<U>(n, begin, end);
#ifdef SLIMTUNE_MEMSAVE_AVX512
      if (vec > 0) relu_vec<T>(x, o, m, begin * 8, vec);
#endif
      relu_bytes<T>(x, o, m, n, begin + vec / 8, end);
    });
    return kSuccess;
  });
}

Status relu_backward_cpu(const ReluBackwardParams& p, void*) {
  const int64_t n = p.n;
  if (n == 0) return kSuccess;
  const uint8_t* m = p.mask;
  return dispatch_cpu_float(p.dtype, [&](auto tag) {
    using U = Bits<decltype(tag)>;
    const U* g = static_cast<const U*>(p.grad);
    U* out = static_cast<U*>(p.grad_in);
    at::parallel_for(0, (n + 7) / 8, 4096, [&](int64_t begin, int64_t end) {
      const int64_t vec = vector_elements<U>(n, begin, end);
#ifdef SLIMTUNE_MEMSAVE_AVX512
      if (vec > 0) relu_backward_vec<U>(g, m, out, begin * 8, vec);
#endif
      relu_backward_bytes<U>(g, m, out, n, begin + vec / 8, end);
    });
    return kSuccess;
  });
}

namespace {

// Visits the outputs of units [begin, end) (planes, or batch entries when channels-last) in
// storage order: f(i, base, st0, st1, st2) with i the output's storage index, st* its window's
// (padded) start and base the storage index of spatial position 0 of its plane; spatial
// position q of that plane sits at base + q * g.channels.
template <typename F>
void for_each_output(const PoolGeometry& g, int64_t begin, int64_t end, F&& f) {
  const int64_t per_plane = g.out[0] * g.out[1] * g.out[2];
  const int64_t in_plane = g.in[0] * g.in[1] * g.in[2];
  const int64_t ch = g.channels;
  for (int64_t u = begin; u < end; ++u) {
    int64_t i = u * per_plane * ch;
    for (int64_t o0 = 0; o0 < g.out[0]; ++o0) {
      const int64_t st0 = o0 * g.stride[0] - g.padding[0];
      for (int64_t o1 = 0; o1 < g.out[1]; ++o1) {
        const int64_t st1 = o1 * g.stride[1] - g.padding[1];
        for (int64_t o2 = 0; o2 < g.out[2]; ++o2) {
          const int64_t st2 = o2 * g.stride[2] - g.padding[2];
          for (int64_t c = 0; c < ch; ++c, ++i) f(i, u * in_plane * ch + c, st0, st1, st2);
        }
      }
    }
  }
}

int64_t units(const PoolGeometry& g) { return g.channels_last ? g.planes / g.channels : g.planes; }

// Offset of `flat` inside the window starting at st*, or -1 when it lies outside that window.
inline int64_t window_offset(const PoolGeometry& g, int64_t flat, int64_t st0, int64_t st1, int64_t st2) {
  const int64_t in_plane = g.in[0] * g.in[1] * g.in[2];
  if (flat < 0 || flat >= in_plane) return -1;
  int64_t rows, c0;
  if (g.fast) {
    rows = g.div_in2.div(static_cast<uint32_t>(flat));
    c0 = g.div_in1.div(static_cast<uint32_t>(rows));
  } else {
    rows = flat / g.in[2];
    c0 = rows / g.in[1];
  }
  const int64_t c[3] = {c0, rows - c0 * g.in[1], flat - rows * g.in[2]};
  const int64_t st[3] = {st0, st1, st2};
  int64_t w = 0;
  for (int d = 0; d < 3; ++d) {
    int64_t delta = c[d] - st[d];
    if (g.dilation[d] != 1) {
      if (delta % g.dilation[d] != 0) return -1;
      delta /= g.dilation[d];
    }
    if (delta < 0 || delta >= g.kernel[d]) return -1;
    w = w * g.kernel[d] + delta;
  }
  return w;
}

}  // namespace

Status maxpool_compact_cpu(const MaxpoolCompactParams& p, void*) {
  const PoolGeometry& g = p.g;
  const int64_t* idx = p.indices;
  signed char* off = p.offsets;
  std::atomic<bool> bad{false};
  // The check that each index lies in its window is free here (the coordinates are split
  // anyway); the glue names the first bad one when this fails.
  at::parallel_for(0, units(g), 1, [&](int64_t begin, int64_t end) {
    bool ok = true;
    for_each_output(g, begin, end, [&](int64_t i, int64_t, int64_t st0, int64_t st1, int64_t st2) {
      const int64_t w = window_offset(g, idx[i], st0, st1, st2);
      ok &= w >= 0;
      off[i] = static_cast<signed char>(w);
    });
    if (!ok) bad.store(true);
  });
  return bad.load() ? kInvalidValue : kSuccess;
}

Status maxpool_backward_cpu(const MaxpoolBackwardParams& p, void*) {
  const PoolGeometry& g = p.g;
  const signed char* off = p.offsets;
  // Window offset -> displacement from the window's (virtual, possibly padded) corner in the
  // flat input plane, and the per-dim tap offsets that keep the target inside the input: at
  // most 127 entries, so the loop below does no division.
  const int64_t window = g.kernel[0] * g.kernel[1] * g.kernel[2];
  std::vector<int64_t> disp(static_cast<size_t>(window));
  std::vector<int64_t> tap(static_cast<size_t>(window) * 3);
  for (int64_t w = 0; w < window; ++w) {
    const int64_t s2 = w % g.kernel[2];
    const int64_t s1 = (w / g.kernel[2]) % g.kernel[1];
    const int64_t s0 = w / (g.kernel[2] * g.kernel[1]);
    disp[static_cast<size_t>(w)] = (s0 * g.dilation[0] * g.in[1] + s1 * g.dilation[1]) * g.in[2] + s2 * g.dilation[2];
    tap[static_cast<size_t>(w) * 3] = s0 * g.dilation[0];
    tap[static_cast<size_t>(w) * 3 + 1] = s1 * g.dilation[1];
    tap[static_cast<size_t>(w) * 3 + 2] = s2 * g.dilation[2];
  }
  std::atomic<bool> bad{false};
  const int64_t cs = g.channels;
  const Status st = dispatch_cpu_float(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    using A = acc_t<T>;
    const T* gr = static_cast<const T*>(p.grad);
    A* out = static_cast<A*>(p.grad_in);
    // One plane (or batch entry) per task: overlapping windows accumulate in order, no races.
    at::parallel_for(0, units(g), 1, [&](int64_t begin, int64_t end) {
      bool ok = true;
      for_each_output(g, begin, end, [&](int64_t i, int64_t base, int64_t st0, int64_t st1, int64_t st2) {
        const int64_t w = off[i];
        // An offset outside the window or onto padding would write out of bounds: skipped, reported.
        if (w < 0 || w >= window) {
          ok = false;
          return;
        }
        const int64_t* t = tap.data() + 3 * w;
        if (static_cast<uint64_t>(st0 + t[0]) >= static_cast<uint64_t>(g.in[0]) ||
            static_cast<uint64_t>(st1 + t[1]) >= static_cast<uint64_t>(g.in[1]) ||
            static_cast<uint64_t>(st2 + t[2]) >= static_cast<uint64_t>(g.in[2])) {
          ok = false;
          return;
        }
        const int64_t corner = (st0 * g.in[1] + st1) * g.in[2] + st2;
        out[base + (corner + disp[static_cast<size_t>(w)]) * cs] += static_cast<A>(gr[i]);
      });
      if (!ok) bad.store(true);
    });
    return kSuccess;
  });
  if (st != kSuccess) return st;
  return bad.load() ? kInvalidValue : kSuccess;
}

namespace {

#ifdef SLIMTUNE_MEMSAVE_AVX512
#define SLIMTUNE_MEMSAVE_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define SLIMTUNE_MEMSAVE_CLONES
#endif

constexpr int kBlocks = 16;  // Philox blocks side by side: the 32x32->64 multiplies vectorize

// keep[k] = the 8 keep bits of Philox block b0 + k, k < kBlocks.
SLIMTUNE_MEMSAVE_CLONES void dropout_keep(uint64_t seed, uint64_t b0, uint32_t thresh, uint8_t* keep) {
  uint32_t c0[kBlocks], c1[kBlocks], c2[kBlocks], c3[kBlocks];
  for (int l = 0; l < kBlocks; ++l) {
    const uint64_t b = b0 + static_cast<uint64_t>(l);
    c0[l] = static_cast<uint32_t>(b);
    c1[l] = static_cast<uint32_t>(b >> 32);
    c2[l] = kDropoutStream;
    c3[l] = 0u;
  }
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  for (int r = 0; r < 10; ++r) {
    for (int l = 0; l < kBlocks; ++l) philox::round(c0[l], c1[l], c2[l], c3[l], k0, k1);
    k0 += philox::kW0;
    k1 += philox::kW1;
  }
  for (int l = 0; l < kBlocks; ++l) keep[l] = static_cast<uint8_t>(philox::keep_bits(c0[l], c1[l], c2[l], c3[l], thresh));
}

}  // namespace

Status dropout_cpu(const DropoutParams& p, void*) {
  const int64_t n = p.n;
  if (n == 0) return kSuccess;
  return dispatch_cpu_float(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    using A = acc_t<T>;
    const T* x = static_cast<const T*>(p.x);
    T* out = static_cast<T*>(p.out);
    const A scale = static_cast<A>(static_cast<T>(A(1) / static_cast<A>(p.keep_prob)));
    const int64_t nblocks = (n + 7) / 8;
    const int64_t groups = (nblocks + kBlocks - 1) / kBlocks;
    at::parallel_for(0, groups, 256, [&](int64_t begin, int64_t end) {
      uint8_t keep[kBlocks];
      for (int64_t gi = begin; gi < end; ++gi) {
        const int64_t b0 = gi * kBlocks;
        dropout_keep(p.seed, static_cast<uint64_t>(b0), p.threshold, keep);
        const int64_t e0 = b0 * 8;
        const int64_t e1 = e0 + kBlocks * 8 < n ? e0 + kBlocks * 8 : n;
        // x times (scale or 0), as stock dropout multiplies by its mask: a dropped NaN stays NaN.
        for (int64_t e = e0; e < e1; ++e) {
          const bool k = (keep[(e - e0) >> 3] >> (e & 7)) & 1u;
          out[e] = static_cast<T>(static_cast<A>(x[e]) * (k ? scale : A(0)));
        }
      }
    });
    return kSuccess;
  });
}

}  // namespace memsave
}  // namespace slimtune
