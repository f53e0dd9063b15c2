// CPU kernels of the memsave family (at::parallel_for over raw pointers).
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <numeric>
#include <type_traits>
#include <vector>

#include "common/acc.h"
#include "common/avx512_lanes.h"
#include "common/cpu_dispatch.h"
#include "common/cpu_features.h"
#include "common/philox.h"
#include "common/philox_cpu.h"
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

// One 64-byte vector of lanes of width sizeof(U): the compares give the mask bits directly,
// one k-register per vector, stored as 8/16/32 bits (whole mask bytes).
template <typename U>
struct Lanes;
// The widths differ only in the intrinsics' lane suffix, the mask type and the signed scalar.
#define SLIMTUNE_LANES(U, MASK, SUFFIX, SCALAR)                                                                        \
  template <>                                                                                                          \
  struct Lanes<U> {                                                                                                    \
    using K = MASK;                                                                                                    \
    SLIMTUNE_AVX512 static __m512i set1(U v) { return _mm512_set1_##SUFFIX(static_cast<SCALAR>(v)); }                  \
    SLIMTUNE_AVX512 static K gt(__m512i a, __m512i b) { return _mm512_cmpgt_##SUFFIX##_mask(a, b); }                   \
    SLIMTUNE_AVX512 static K eq(__m512i a, __m512i b) { return _mm512_cmpeq_##SUFFIX##_mask(a, b); }                   \
    SLIMTUNE_AVX512 static __m512i keep(K k, __m512i v) { return _mm512_maskz_mov_##SUFFIX(k, v); }                    \
  };
SLIMTUNE_LANES(uint16_t, __mmask32, epi16, short)
SLIMTUNE_LANES(uint32_t, __mmask16, epi32, int)
SLIMTUNE_LANES(uint64_t, __mmask8, epi64, long long)
#undef SLIMTUNE_LANES

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
#else
// Without AVX-512 whole vectors cover no element (relu_lanes is 0): never called.
template <typename T>
void relu_vec(const Bits<T>*, Bits<T>*, uint8_t*, int64_t, int64_t) {}
template <typename U>
void relu_backward_vec(const U*, const uint8_t*, U*, int64_t, int64_t) {}
#endif

#ifdef SLIMTUNE_MEMSAVE_AVX512
// float32 on AVX2 without AVX-512: 8 lanes, one mask byte per vector, the same bits as relu_vec
// (a lane passes when above zero or NaN; the output drops only what is below zero).
#define SLIMTUNE_AVX2 __attribute__((target("avx2")))

SLIMTUNE_AVX2 void relu_vec_avx2(const float* x, float* out, uint8_t* m, int64_t first, int64_t count) {
  const __m256 zero = _mm256_setzero_ps();
  for (int64_t i = first; i < first + count; i += 8) {
    const __m256 v = _mm256_loadu_ps(x + i);
    if (out != nullptr) _mm256_storeu_ps(out + i, _mm256_andnot_ps(_mm256_cmp_ps(v, zero, _CMP_LT_OQ), v));
    m[i / 8] = static_cast<uint8_t>(_mm256_movemask_ps(_mm256_cmp_ps(v, zero, _CMP_NLE_UQ)));
  }
}

SLIMTUNE_AVX2 void relu_backward_vec_avx2(const float* g, const uint8_t* m, float* out, int64_t first,
                                          int64_t count) {
  const __m256i bit = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
  for (int64_t i = first; i < first + count; i += 8) {
    const __m256i lanes = _mm256_and_si256(_mm256_set1_epi32(m[i / 8]), bit);
    const __m256 keep = _mm256_castsi256_ps(_mm256_cmpeq_epi32(lanes, bit));
    _mm256_storeu_ps(out + i, _mm256_and_ps(_mm256_loadu_ps(g + i), keep));
  }
}
#else
// Without AVX2 forms relu_lanes is never 8: never called.
inline void relu_vec_avx2(const float*, float*, uint8_t*, int64_t, int64_t) {}
inline void relu_backward_vec_avx2(const float*, const uint8_t*, float*, int64_t, int64_t) {}
#endif

// The float32 view the AVX2 forms take (called for float32 only; the others never reach them).
template <typename U>
const float* as_float(const U* p) {
  return reinterpret_cast<const float*>(p);
}
template <typename U>
float* as_float(U* p) {
  return reinterpret_cast<float*>(p);
}

// A ReLU pass's vector step: the AVX2 form where relu_lanes chose it (float32 only), else AVX-512.
template <typename T, typename Avx2, typename Avx512>
void relu_vector_step(int64_t lanes, const Avx2& avx2, const Avx512& avx512) {
  if constexpr (std::is_same_v<T, float>) {
    if (lanes == 8) return avx2();
  }
  avx512();
}

// The vector width of this machine's ReLU path for lanes of U, in elements (0: bytes only).
template <typename U>
int64_t relu_lanes() {
#ifdef SLIMTUNE_MEMSAVE_AVX512
  if (cpu_avx512()) return 64 / sizeof(U);
  if (std::is_same_v<U, uint32_t> && cpu_avx2()) return 8;
#endif
  return 0;
}

// Runs over n elements in chunks of whole mask bytes, so that no two tasks write one mask byte:
// per chunk, vec(first, count) over the elements whole vectors of `lanes` cover, then
// bytes(begin, end) over the mask bytes left.
template <typename Vec, typename Bytes>
void over_mask_bytes(int64_t n, int64_t lanes, const Vec& vec, const Bytes& bytes) {
  at::parallel_for(0, (n + 7) / 8, 4096, [&](int64_t begin, int64_t end) {
    const int64_t last = end * 8 < n ? end * 8 : n;
    const int64_t count = lanes > 0 ? (last - begin * 8) / lanes * lanes : 0;
    if (count > 0) vec(begin * 8, count);
    bytes(begin + count / 8, end);
  });
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
    const int64_t n = p.n, lanes = relu_lanes<U>();
    over_mask_bytes(
        n, lanes,
        [&](int64_t first, int64_t count) {
          relu_vector_step<T>(
              lanes, [&] { relu_vec_avx2(as_float(x), as_float(o), m, first, count); },
              [&] { relu_vec<T>(x, o, m, first, count); });
        },
        [&](int64_t begin, int64_t end) { relu_bytes<T>(x, o, m, n, begin, end); });
    return kSuccess;
  });
}

Status relu_backward_cpu(const ReluBackwardParams& p, void*) {
  const int64_t n = p.n;
  if (n == 0) return kSuccess;
  const uint8_t* m = p.mask;
  return dispatch_cpu_float(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    using U = Bits<T>;
    const U* g = static_cast<const U*>(p.grad);
    U* out = static_cast<U*>(p.grad_in);
    const int64_t lanes = relu_lanes<U>();
    over_mask_bytes(
        n, lanes,
        [&](int64_t first, int64_t count) {
          relu_vector_step<T>(
              lanes, [&] { relu_backward_vec_avx2(as_float(g), m, as_float(out), first, count); },
              [&] { relu_backward_vec<U>(g, m, out, first, count); });
        },
        [&](int64_t begin, int64_t end) { relu_backward_bytes<U>(g, m, out, n, begin, end); });
    return kSuccess;
  });
}

namespace {

// The taps of one window: per offset w, its displacement from the window's (virtual, possibly
// padded) corner in the flat input plane and its per-dim distance from the corner; and, where
// the displacements are distinct and span at most 64K positions, the inverse table
// displacement -> w. With it an argmax index becomes its offset by one subtraction and one
// lookup, where splitting it into coordinates costs two divisions per element.
struct Taps {
  int64_t window;
  std::vector<int64_t> disp;
  std::vector<int64_t> dist;  // 3 per w
  int64_t reach[3];           // (kernel - 1) * dilation
  std::vector<int8_t> inverse;

  explicit Taps(const PoolGeometry& g) : window(g.kernel[0] * g.kernel[1] * g.kernel[2]) {
    disp.resize(static_cast<size_t>(window));
    dist.resize(static_cast<size_t>(window) * 3);
    for (int d = 0; d < 3; ++d) reach[d] = (g.kernel[d] - 1) * g.dilation[d];
    for (int64_t w = 0; w < window; ++w) {
      const int64_t k[3] = {w / (g.kernel[2] * g.kernel[1]), (w / g.kernel[2]) % g.kernel[1], w % g.kernel[2]};
      int64_t* t = &dist[static_cast<size_t>(w) * 3];
      for (int d = 0; d < 3; ++d) t[d] = k[d] * g.dilation[d];
      disp[static_cast<size_t>(w)] = (t[0] * g.in[1] + t[1]) * g.in[2] + t[2];
    }
    const int64_t range = disp.back() + 1;  // the last tap reaches furthest
    if (range > (int64_t{1} << 16)) return;
    inverse.assign(static_cast<size_t>(range), -1);
    for (int64_t w = 0; w < window; ++w) {
      int8_t& slot = inverse[static_cast<size_t>(disp[static_cast<size_t>(w)])];
      if (slot >= 0) {  // two taps share a displacement (a window wider than the input): no table
        inverse.clear();
        return;
      }
      slot = static_cast<int8_t>(w);
    }
  }

  // Whether tap w of the window at st lands inside the input (not on padding).
  bool lands(const PoolGeometry& g, int64_t w, const int64_t* st) const {
    const int64_t* t = &dist[static_cast<size_t>(w) * 3];
    for (int d = 0; d < 3; ++d) {
      if (static_cast<uint64_t>(st[d] + t[d]) >= static_cast<uint64_t>(g.in[d])) return false;
    }
    return true;
  }
};

// Visits the window positions of units [begin, end) (planes, or batch entries when channels-
// last) in storage order: f(i, u, st, corner, inside) for the first of the g.channels outputs at
// that position (storage index i, channel c at i + c), st its window's padded start, corner the
// flat plane position of that start and inside whether every tap lands in the input (decided
// per row, and along the row by a precomputed range).
template <typename F>
void for_each_window(const PoolGeometry& g, const Taps& taps, int64_t begin, int64_t end, F&& f) {
  const int64_t per_plane = g.out[0] * g.out[1] * g.out[2];
  // Window positions along dim 2 clear of both borders: [lo2, hi2].
  const int64_t lo2 = (g.padding[2] + g.stride[2] - 1) / g.stride[2];
  const int64_t hi2 = g.in[2] - 1 - taps.reach[2] + g.padding[2] < 0
                          ? -1
                          : (g.in[2] - 1 - taps.reach[2] + g.padding[2]) / g.stride[2];
  for (int64_t u = begin; u < end; ++u) {
    int64_t i = u * per_plane * g.channels;
    int64_t st[3];
    for (int64_t o0 = 0; o0 < g.out[0]; ++o0) {
      st[0] = o0 * g.stride[0] - g.padding[0];
      for (int64_t o1 = 0; o1 < g.out[1]; ++o1) {
        st[1] = o1 * g.stride[1] - g.padding[1];
        const bool row_inside =
            st[0] >= 0 && st[0] + taps.reach[0] < g.in[0] && st[1] >= 0 && st[1] + taps.reach[1] < g.in[1];
        const int64_t row_corner = (st[0] * g.in[1] + st[1]) * g.in[2];
        for (int64_t o2 = 0; o2 < g.out[2]; ++o2, i += g.channels) {
          st[2] = o2 * g.stride[2] - g.padding[2];
          f(i, u, st, row_corner + st[2], row_inside && o2 >= lo2 && o2 <= hi2);
        }
      }
    }
  }
}

// Offset of `flat` inside the window starting at st, or -1 when it lies outside that window
// (the general path: fast dividers split flat into coordinates).
inline int64_t window_offset(const PoolGeometry& g, int64_t flat, const int64_t* st) {
  const int64_t in_plane = g.in[0] * g.in[1] * g.in[2];
  if (flat < 0 || flat >= in_plane) return -1;
  int64_t c[3];
  split_spatial(g, flat, c);
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
  const Taps taps(g);
  const int8_t* inv = taps.inverse.empty() ? nullptr : taps.inverse.data();
  const uint64_t range = taps.inverse.size();
  const int64_t ch = g.channels;
  std::atomic<bool> bad{false};
  // The check that each index lies in its window comes with the conversion; the glue names the
  // first bad one when this fails.
  at::parallel_for(0, pool_units(g), 1, [&](int64_t begin, int64_t end) {
    bool ok = true;
    for_each_window(g, taps, begin, end, [&](int64_t i, int64_t, const int64_t* st, int64_t corner, bool inside) {
      if (inv != nullptr) {
        for (int64_t c = 0; c < ch; ++c) {
          const uint64_t delta = static_cast<uint64_t>(idx[i + c] - corner);
          int64_t w = delta < range ? inv[delta] : -1;
          if (w >= 0 && !inside && !taps.lands(g, w, st)) w = -1;
          ok &= w >= 0;
          off[i + c] = static_cast<signed char>(w);
        }
      } else {
        for (int64_t c = 0; c < ch; ++c) {
          const int64_t w = window_offset(g, idx[i + c], st);
          ok &= w >= 0;
          off[i + c] = static_cast<signed char>(w);
        }
      }
    });
    if (!ok) bad.store(true);
  });
  return bad.load() ? kInvalidValue : kSuccess;
}

namespace {

#ifdef SLIMTUNE_MEMSAVE_AVX512
#define SLIMTUNE_POOL_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define SLIMTUNE_POOL_CLONES
#endif

// One tap over n outputs side by side: v_j = x[j * S] (S the step between neighbouring outputs'
// windows, 0 for a runtime step), taken where above the running max m_j or NaN, as ATen
// decides; o_j then becomes w. Written as selects so that it vectorizes.
template <int S, typename T, typename A>
inline void tap_step_impl(const T* __restrict__ x, int64_t step, int64_t n, A* __restrict__ m,
                          signed char* __restrict__ o, signed char w) {
  const int64_t s = S > 0 ? S : step;
  for (int64_t j = 0; j < n; ++j) {
    const A v = static_cast<A>(x[j * s]);
    const bool take = v > m[j] || v != v;
    m[j] = take ? v : m[j];
    o[j] = take ? w : o[j];
  }
}

// target_clones takes no templates: the float and double steps of 1 and 2 are stamped out
// cloned (the common pools), the others use the template as it is.
#define SLIMTUNE_TAP_CLONES(A, S)                                                                        \
  SLIMTUNE_POOL_CLONES void tap_step_##S(const A* x, int64_t n, A* m, signed char* o, signed char w) { \
    tap_step_impl<S>(x, S, n, m, o, w);                                                                \
  }
SLIMTUNE_TAP_CLONES(float, 1)
SLIMTUNE_TAP_CLONES(float, 2)
SLIMTUNE_TAP_CLONES(double, 1)
SLIMTUNE_TAP_CLONES(double, 2)

template <typename T, typename A>
void tap_step(const T* x, int64_t step, int64_t n, A* m, signed char* o, signed char w) {
  if constexpr (std::is_same_v<T, A>) {
    if (step == 1) return tap_step_1(x, n, m, o, w);
    if (step == 2) return tap_step_2(x, n, m, o, w);
  }
  tap_step_impl<0>(x, step, n, m, o, w);
}

// The window at st (storage index of its corner `base`, taps displaced by dc): its max and the
// offset of its argmax, scalar (windows on the border, or a lone output).
template <typename T, typename A>
inline void pool_window(const PoolGeometry& g, const Taps& taps, const T* x, int64_t base, const int64_t* dc,
                        const int64_t* st, bool inside, T* out, signed char* off) {
  int64_t first = 0;
  if (!inside) {
    while (!taps.lands(g, first, st)) ++first;  // every window holds a tap inside the input
  }
  A best = static_cast<A>(x[base + dc[first]]);
  int64_t arg = first;
  for (int64_t w = first + 1; w < taps.window; ++w) {
    if (!inside && !taps.lands(g, w, st)) continue;
    const A v = static_cast<A>(x[base + dc[w]]);
    if (v > best || v != v) {
      best = v;
      arg = w;
    }
  }
  *out = static_cast<T>(best);
  *off = static_cast<signed char>(arg);
}

#ifdef SLIMTUNE_MEMSAVE_AVX512
// Channels-last float32 windows on AVX-512, 64 channels at a time: the running maxima stay in
// four registers and the offsets in one across the window's taps (the portable form keeps both
// in memory and goes through them once per tap). Takes each tap as tap_step does: above the
// running max, or NaN. Returns the channels done (whole blocks of 64); the caller does the rest.
SLIMTUNE_AVX512 int64_t window_cl_avx512(const float* x, const int64_t* dc, const int64_t* taps, int n, int64_t ch,
                                         float* out, signed char* off) {
  const int64_t whole = ch - ch % 64;
  for (int64_t c0 = 0; c0 < whole; c0 += 64) {
    __m512 m[4];
    const float* x0 = x + dc[taps[0]] + c0;
    for (int v = 0; v < 4; ++v) m[v] = _mm512_loadu_ps(x0 + v * 16);
    __m512i o = _mm512_set1_epi8(static_cast<char>(taps[0]));
    for (int j = 1; j < n; ++j) {
      const float* xw = x + dc[taps[j]] + c0;
      uint64_t take = 0;
      for (int v = 0; v < 4; ++v) {
        const __m512 val = _mm512_loadu_ps(xw + v * 16);
        const __mmask16 k = _mm512_cmp_ps_mask(val, m[v], _CMP_GT_OQ) | _mm512_cmp_ps_mask(val, val, _CMP_UNORD_Q);
        m[v] = _mm512_mask_mov_ps(m[v], k, val);
        take |= static_cast<uint64_t>(k) << (16 * v);
      }
      o = _mm512_mask_mov_epi8(o, take, _mm512_set1_epi8(static_cast<char>(taps[j])));
    }
    for (int v = 0; v < 4; ++v) _mm512_storeu_ps(out + c0 + v * 16, m[v]);
    _mm512_storeu_si512(off + c0, o);
  }
  return whole;
}
#endif

}  // namespace

Status maxpool_forward_cpu(const MaxpoolForwardParams& p, void*) {
  const PoolGeometry& g = p.g;
  const Taps taps(g);
  const int64_t in_plane = g.in[0] * g.in[1] * g.in[2];
  const int64_t ch = g.channels;
  const int64_t window = taps.window;
  std::vector<int64_t> disp_ch(taps.disp);
  for (int64_t& d : disp_ch) d *= ch;
  const int64_t* dc = disp_ch.data();
  // Along dim 2, the windows clear of both borders: [lo2, hi2] (as for_each_window).
  const int64_t lo2 = (g.padding[2] + g.stride[2] - 1) / g.stride[2];
  const int64_t far = g.in[2] - 1 - taps.reach[2] + g.padding[2];
  const int64_t hi2 = far < 0 ? -1 : std::min(far / g.stride[2], g.out[2] - 1);
#ifdef SLIMTUNE_MEMSAVE_AVX512
  const bool vec = cpu_avx512();
#endif
  return dispatch_cpu_float(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    using A = acc_t<T>;
    const T* x = static_cast<const T*>(p.x);
    T* out = static_cast<T*>(p.out);
    signed char* off = p.offsets;
    at::parallel_for(0, pool_units(g), 1, [&](int64_t begin, int64_t end) {
      // Running maxima of one row of outputs (planes-major) or of one position's channels.
      std::vector<A> running(static_cast<size_t>(std::max(ch, g.out[2])));
      A* m = running.data();
      if (ch > 1) {
        // Channels-last: tap by tap over all channels of a position (contiguous in memory).
        // The taps landing in the input: all of them for a window clear of the border.
        std::vector<int64_t> all(static_cast<size_t>(window)), border(static_cast<size_t>(window));
        std::iota(all.begin(), all.end(), int64_t{0});
        for_each_window(g, taps, begin, end, [&](int64_t i, int64_t u, const int64_t* st, int64_t corner, bool inside) {
          const int64_t base = (u * in_plane + corner) * ch;
          const int64_t* here = all.data();
          int n = static_cast<int>(window);
          if (!inside) {
            n = 0;
            for (int64_t w = 0; w < window; ++w) {
              if (taps.lands(g, w, st)) border[static_cast<size_t>(n++)] = w;
            }
            here = border.data();
          }
          int64_t c0 = 0;  // channels [0, c0) done by the vector form
#ifdef SLIMTUNE_MEMSAVE_AVX512
          if constexpr (std::is_same_v<T, float>) {
            if (vec) c0 = window_cl_avx512(x + base, dc, here, n, ch, out + i, off + i);
          }
#endif
          if (c0 == ch) return;
          const int64_t nc = ch - c0;
          signed char* o = off + i + c0;
          const T* x0 = x + base + c0 + dc[here[0]];
          for (int64_t c = 0; c < nc; ++c) {
            m[c] = static_cast<A>(x0[c]);
            o[c] = static_cast<signed char>(here[0]);
          }
          for (int j = 1; j < n; ++j) {
            const int64_t w = here[j];
            tap_step(x + base + c0 + dc[w], 1, nc, m, o, static_cast<signed char>(w));
          }
          for (int64_t c = 0; c < nc; ++c) out[i + c0 + c] = static_cast<T>(m[c]);
        });
        return;
      }
      // Planes-major: a row of outputs at a time, its interior windows tap by tap side by side
      // (neighbours' windows stride[2] apart), the border windows one by one.
      for (int64_t u = begin; u < end; ++u) {
        int64_t i = u * g.out[0] * g.out[1] * g.out[2];
        int64_t st[3];
        for (int64_t o0 = 0; o0 < g.out[0]; ++o0) {
          st[0] = o0 * g.stride[0] - g.padding[0];
          for (int64_t o1 = 0; o1 < g.out[1]; ++o1, i += g.out[2]) {
            st[1] = o1 * g.stride[1] - g.padding[1];
            const bool row_inside = st[0] >= 0 && st[0] + taps.reach[0] < g.in[0] && st[1] >= 0 &&
                                    st[1] + taps.reach[1] < g.in[1];
            const int64_t row_base = u * in_plane + (st[0] * g.in[1] + st[1]) * g.in[2];
            const int64_t a = row_inside ? lo2 : g.out[2], b = row_inside ? hi2 + 1 : g.out[2];
            for (int64_t o2 = 0; o2 < g.out[2]; ++o2) {
              if (o2 == a && b > a) {
                o2 = b - 1;
                continue;
              }
              st[2] = o2 * g.stride[2] - g.padding[2];
              pool_window<T, A>(g, taps, x, row_base + st[2], dc, st, false, out + i + o2, off + i + o2);
            }
            if (b <= a) continue;
            const int64_t n = b - a;
            const T* corner = x + row_base + a * g.stride[2] - g.padding[2];
            signed char* o = off + i + a;
            for (int64_t j = 0; j < n; ++j) {
              m[j] = static_cast<A>(corner[j * g.stride[2]]);
              o[j] = 0;
            }
            for (int64_t w = 1; w < window; ++w) {
              tap_step(corner + dc[w], g.stride[2], n, m, o, static_cast<signed char>(w));
            }
            for (int64_t j = 0; j < n; ++j) out[i + a + j] = static_cast<T>(m[j]);
          }
        }
      }
    });
    return kSuccess;
  });
}

namespace {

// ---- max-pool backward ----
//
// Channels-last: a gather. Each input position sums, over the windows covering it in ascending
// window order, the gradients of those whose argmax it is, and is written once (no clearing,
// no read-modify-write); the compares run over channels side by side. Planes-major: a scatter
// into the plane, which is cleared just before while in cache. Both add in the accumulation
// type from zero in ascending window order and round once on store, so every layout, path and
// backend gives the same bits.

// Calls f(o, k) for the windows o along dim d whose taps land on input coordinate c, in
// ascending order, k the tap of o that does (a window reached only between its dilated taps is
// left out).
template <typename F>
void for_each_cover(const PoolGeometry& g, int d, int64_t c, F&& f) {
  const int64_t top = c + g.padding[d];
  const int64_t bottom = top - (g.kernel[d] - 1) * g.dilation[d];
  const int64_t hi = std::min(top / g.stride[d], g.out[d] - 1);
  const int64_t lo = bottom <= 0 ? 0 : (bottom + g.stride[d] - 1) / g.stride[d];
  for (int64_t w = lo; w <= hi; ++w) {
    const int64_t delta = top - w * g.stride[d];
    if (delta % g.dilation[d] == 0) f(w, delta / g.dilation[d]);
  }
}

// The windows along dim d covering each input coordinate: those of c are entries
// [first[c], first[c + 1]) of o and k (at most kernel[d] each).
struct Cover {
  std::vector<int64_t> first, o, k;
  Cover(const PoolGeometry& g, int d) {
    first.push_back(0);
    for (int64_t c = 0; c < g.in[d]; ++c) {
      for_each_cover(g, d, c, [&](int64_t w, int64_t t) {
        o.push_back(w);
        k.push_back(t);
      });
      first.push_back(static_cast<int64_t>(o.size()));
    }
  }
};

// The windows covering one input position: the storage index of each one's channel 0 in grad
// and offsets, and the tap that lands on the position; at most 127 (one per tap).
struct Windows {
  int n = 0;
  int64_t at[128];
  signed char tap[128];
};

// The windows covering the positions of one input row (a batch entry's positions (s0, s1, *)).
struct RowCover {
  int n01 = 0;
  int64_t o01[128], k01[128];  // along dims 0 and 1, ascending: first output and tap of each

  // Row `row` = (unit * in[0] + s0) * in[1] + s1.
  void set(const PoolGeometry& g, int64_t row) {
    const int64_t c1 = row % g.in[1], t = row / g.in[1];
    const int64_t c0 = t % g.in[0], unit = t / g.in[0];
    const int64_t per_plane = g.out[0] * g.out[1] * g.out[2];
    n01 = 0;
    for_each_cover(g, 0, c0, [&](int64_t w0, int64_t k0) {
      for_each_cover(g, 1, c1, [&](int64_t w1, int64_t k1) {
        o01[n01] = (unit * per_plane + (w0 * g.out[1] + w1) * g.out[2]) * g.channels;
        k01[n01] = (k0 * g.kernel[1] + k1) * g.kernel[2];
        ++n01;
      });
    });
  }

  // The windows covering position c2 of the row, in ascending window order.
  void windows(const PoolGeometry& g, const Cover& cover2, int64_t c2, Windows& win) const {
    const int64_t e0 = cover2.first[static_cast<size_t>(c2)], e1 = cover2.first[static_cast<size_t>(c2) + 1];
    win.n = 0;
    for (int a = 0; a < n01; ++a) {
      for (int64_t e = e0; e < e1; ++e) {
        win.at[win.n] = o01[a] + cover2.o[static_cast<size_t>(e)] * g.channels;
        win.tap[win.n] = static_cast<signed char>(k01[a] + cover2.k[static_cast<size_t>(e)]);
        ++win.n;
      }
    }
  }
};

// Channel block of the portable gather: small enough to stay in registers and L1.
constexpr int64_t kGatherBlock = 64;

// a when it is a NaN, else b. A sum that is a NaN stays that NaN: the compiler may put either
// operand of an addition first and x86 returns the first of two NaNs, where the vector path's
// masked add keeps the sum's. Decided on the bits, as a compare would stop the loop vectorizing.
template <typename A>
inline A nan_or(A a, A b) {
  using U = Bits<A>;
  U ua, ub;
  std::memcpy(&ua, &a, sizeof(A));
  std::memcpy(&ub, &b, sizeof(A));
  const U nan = static_cast<U>(-static_cast<U>((ua & ~kSign<U>) > kInfBits<A>));
  const U r = ub ^ ((ua ^ ub) & nan);
  A out;
  std::memcpy(&out, &r, sizeof(A));
  return out;
}

// grad_in[c0 + c] for c < n (kN when not 0, a whole block known at compile time, so the
// accumulators can stay in registers) at one position: the sum over its windows of
// (offset == tap ? grad : 0). Returns how many (window, channel) offsets matched (each valid
// offset matches exactly once over the whole gather, an invalid one never: the count checks
// them all).
template <typename T, typename A, int64_t kN>
__attribute__((always_inline)) inline int64_t gather_portable_block(const T* __restrict__ gr,
                                                                    const signed char* __restrict__ off,
                                                                    const Windows& win, int64_t c0, int64_t n,
                                                                    T* __restrict__ out) {
  const int64_t nc = kN > 0 ? kN : n;
  int64_t matches = 0;
  A acc[kGatherBlock];
  for (int64_t c = 0; c < nc; ++c) acc[c] = A(0);
  for (int j = 0; j < win.n; ++j) {
    const T* gj = gr + win.at[j] + c0;
    const signed char* oj = off + win.at[j] + c0;
    const signed char t = win.tap[j];
    int32_t hits = 0;  // the width of a float lane: the count vectorizes alongside the sums
    for (int64_t c = 0; c < nc; ++c) {
      // Adding +0.0 leaves a sum that started at +0.0 unchanged: the same bits as adding only
      // the matches, and without a branch (or a conditional load) the loop vectorizes.
      const A v = static_cast<A>(gj[c]);
      const bool hit = oj[c] == t;
      acc[c] = nan_or(acc[c], acc[c] + (hit ? v : A(0)));
      hits += hit;
    }
    matches += hits;
  }
  for (int64_t c = 0; c < nc; ++c) out[c0 + c] = static_cast<T>(acc[c]);
  return matches;
}

template <typename T, typename A>
__attribute__((always_inline)) inline int64_t gather_portable(const T* gr, const signed char* off, const Windows& win,
                                                              int64_t ch, T* out) {
  int64_t matches = 0;
  int64_t c0 = 0;
  for (; c0 + kGatherBlock <= ch; c0 += kGatherBlock) {
    matches += gather_portable_block<T, A, kGatherBlock>(gr, off, win, c0, kGatherBlock, out);
  }
  if (c0 < ch) matches += gather_portable_block<T, A, 0>(gr, off, win, c0, ch - c0, out);
  return matches;
}

// The channels-last gather's walk over input rows [begin, end): step(win, dst) gathers each
// position's channels (dst: g.channels of them in out) from the windows covering it. Inlined into
// its caller, so a step compiled for AVX-512 (gather_rows_avx512) runs inside the same function.
template <typename T, typename Step>
__attribute__((always_inline)) inline void gather_walk(const PoolGeometry& g, T* out, int64_t begin, int64_t end,
                                                       const Cover& cover2, Step&& step) {
  const int64_t ch = g.channels;
  RowCover rc;
  Windows win;
  for (int64_t row = begin; row < end; ++row) {
    rc.set(g, row);
    T* dst = out + row * g.in[2] * ch;
    for (int64_t c2 = 0; c2 < g.in[2]; ++c2, dst += ch) {
      rc.windows(g, cover2, c2, win);
      step(win, dst);
    }
  }
}

#ifdef SLIMTUNE_MEMSAVE_AVX512
#define SLIMTUNE_AVX512_GATHER __attribute__((target("avx512f,avx512bw,popcnt")))
// GCC's intrinsic headers fill the unused lanes of widening and casting moves with a
// self-initialized "undefined" vector, which its uninitialized-use analysis reports once
// inlined here.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

// The loads, masked adds and rounding stores of the gather, per storage type: a block of 64
// channels is kVecs accumulators of kLanes. A whole block loads and stores without masks
// (masked moves cost more, a masked store onto a page not yet touched most); only the last,
// partial block is masked.
template <typename T>
struct GatherVec;
// float and double: their own lanes, differing only in the intrinsics' suffix and mask width.
#define SLIMTUNE_GATHER_VEC(T, LANES, VEC, SFX, MASK)                                            \
  template <>                                                                                    \
  struct GatherVec<T> {                                                                          \
    static constexpr int kLanes = LANES;                                                         \
    using V = VEC;                                                                               \
    SLIMTUNE_AVX512_GATHER static V zero() { return _mm512_setzero_##SFX(); }                    \
    template <bool kFull>                                                                        \
    SLIMTUNE_AVX512_GATHER static V load(const T* p, __mmask16 m) {                              \
      return kFull ? _mm512_loadu_##SFX(p) : _mm512_maskz_loadu_##SFX(static_cast<MASK>(m), p); \
    }                                                                                            \
    SLIMTUNE_AVX512_GATHER static V add(V acc, __mmask16 k, V v) {                               \
      return _mm512_mask_add_##SFX(acc, static_cast<MASK>(k), acc, v);                           \
    }                                                                                            \
    template <bool kFull>                                                                        \
    SLIMTUNE_AVX512_GATHER static void store(T* p, __mmask16 m, V v) {                           \
      if (kFull) {                                                                               \
        _mm512_storeu_##SFX(p, v);                                                               \
      } else {                                                                                   \
        _mm512_mask_storeu_##SFX(p, static_cast<MASK>(m), v);                                    \
      }                                                                                          \
    }                                                                                            \
  };
SLIMTUNE_GATHER_VEC(float, 16, __m512, ps, __mmask16)
SLIMTUNE_GATHER_VEC(double, 8, __m512d, pd, __mmask8)
#undef SLIMTUNE_GATHER_VEC

// 16 lanes of 16 bits, through 512-bit masked moves when partial (AVX-512 BW; the 256-bit
// forms need VL).
template <bool kFull>
SLIMTUNE_AVX512_GATHER inline __m256i load16(const void* p, __mmask16 m) {
  if (kFull) return _mm256_loadu_si256(static_cast<const __m256i*>(p));
  return _mm512_castsi512_si256(_mm512_maskz_loadu_epi16(static_cast<__mmask32>(m), p));
}
// The low 16 bits of each 32-bit lane of r.
template <bool kFull>
SLIMTUNE_AVX512_GATHER inline void store16(void* p, __mmask16 m, __m512i r) {
  const __m256i h = _mm512_cvtepi32_epi16(r);
  if (kFull) {
    _mm256_storeu_si256(static_cast<__m256i*>(p), h);
  } else {
    _mm512_mask_storeu_epi16(p, static_cast<__mmask32>(m), _mm512_castsi256_si512(h));
  }
}

// 16-bit types accumulate in float and round once as c10's conversions do (common/avx512_lanes.h),
// so this path and the portable one store the same bits.
struct FloatSums {  // 16 float32 lanes: the sums of the 16-bit types
  static constexpr int kLanes = 16;
  using V = __m512;
  SLIMTUNE_AVX512_GATHER static V zero() { return _mm512_setzero_ps(); }
  SLIMTUNE_AVX512_GATHER static V add(V acc, __mmask16 k, V v) { return _mm512_mask_add_ps(acc, k, acc, v); }
};
template <>
struct GatherVec<c10::BFloat16> : FloatSums {
  template <bool kFull>
  SLIMTUNE_AVX512_GATHER static V load(const c10::BFloat16* p, __mmask16 m) {
    return avx512_lanes::widen_bf16(load16<kFull>(p, m));
  }
  template <bool kFull>
  SLIMTUNE_AVX512_GATHER static void store(c10::BFloat16* p, __mmask16 m, V v) {
    store16<kFull>(p, m, avx512_lanes::round_bf16(v));
  }
};
template <>
struct GatherVec<c10::Half> : FloatSums {
  template <bool kFull>
  SLIMTUNE_AVX512_GATHER static V load(const c10::Half* p, __mmask16 m) {
    return avx512_lanes::widen_half(load16<kFull>(p, m));
  }
  template <bool kFull>
  SLIMTUNE_AVX512_GATHER static void store(c10::Half* p, __mmask16 m, V v) {
    store16<kFull>(p, m, avx512_lanes::round_half(v));
  }
};

// Which of kL channels' offsets at o (those of `lanes` when not kFull) equal tap: each offset
// widened to the accumulator's lane, so the compare gives the add's mask directly.
template <int kL, bool kFull>
SLIMTUNE_AVX512_GATHER inline __mmask16 tap_hits(const signed char* o, __mmask16 lanes, signed char tap) {
  if constexpr (kL == 16) {
    const __m128i b = kFull ? _mm_loadu_si128(reinterpret_cast<const __m128i*>(o))
                            : _mm512_castsi512_si128(_mm512_maskz_loadu_epi8(lanes, o));
    return _mm512_mask_cmpeq_epi32_mask(lanes, _mm512_cvtepi8_epi32(b), _mm512_set1_epi32(tap));
  } else {
    const __m128i b = kFull ? _mm_loadl_epi64(reinterpret_cast<const __m128i*>(o))
                            : _mm512_castsi512_si128(_mm512_maskz_loadu_epi8(lanes, o));
    return _mm512_mask_cmpeq_epi64_mask(static_cast<__mmask8>(lanes), _mm512_cvtepi8_epi64(b), _mm512_set1_epi64(tap));
  }
}

// The matches of the vector gather, counted per lane and summed every kFlush blocks of 64
// channels (a block adds at most 127 to a lane: no lane overflows).
struct MatchCount {
  static constexpr int kFlush = 1 << 20;
  __m512i lanes;
  int blocks = 0;
  int64_t total = 0;
  SLIMTUNE_AVX512_GATHER MatchCount() : lanes(_mm512_setzero_si512()) {}
  SLIMTUNE_AVX512_GATHER void add(__mmask16 hit) {
    lanes = _mm512_mask_sub_epi32(lanes, hit, lanes, _mm512_set1_epi32(-1));
  }
  SLIMTUNE_AVX512_GATHER void block_done() {
    if (++blocks == kFlush) flush();
  }
  SLIMTUNE_AVX512_GATHER int64_t flush() {
    total += _mm512_reduce_add_epi32(lanes);
    lanes = _mm512_setzero_si512();
    blocks = 0;
    return total;
  }
};

// Channels [c0, c0 + 64) (those of `live` when not kFull) of gather_portable, the same sums in
// the same order: a lane without a match adds nothing, without a branch.
template <typename T, bool kFull>
SLIMTUNE_AVX512_GATHER __attribute__((always_inline)) inline void gather_block(const T* gr, const signed char* off,
                                                                              const Windows& win, int64_t c0,
                                                                              uint64_t live, T* out,
                                                                              MatchCount& count) {
  using Vec = GatherVec<T>;
  constexpr int kL = Vec::kLanes, kVecs = 64 / kL;
  constexpr uint64_t kLaneMask = (uint64_t{1} << kL) - 1;
  typename Vec::V acc[kVecs];
  for (int v = 0; v < kVecs; ++v) acc[v] = Vec::zero();
  for (int j = 0; j < win.n; ++j) {
    const int64_t at = win.at[j] + c0;
    for (int v = 0; v < kVecs; ++v) {
      const __mmask16 lanes = static_cast<__mmask16>((live >> (v * kL)) & kLaneMask);
      const __mmask16 hit = tap_hits<kL, kFull>(off + at + v * kL, lanes, win.tap[j]);
      acc[v] = Vec::add(acc[v], hit, Vec::template load<kFull>(gr + at + v * kL, lanes));
      count.add(hit);
    }
  }
  count.block_done();
  for (int v = 0; v < kVecs; ++v) {
    Vec::template store<kFull>(out + c0 + v * kL, static_cast<__mmask16>((live >> (v * kL)) & kLaneMask), acc[v]);
  }
}

// gather_portable through AVX-512, 64 channels per block.
template <typename T>
SLIMTUNE_AVX512_GATHER __attribute__((always_inline)) inline void gather_avx512(const T* gr, const signed char* off,
                                                                               const Windows& win, int64_t ch, T* out,
                                                                               MatchCount& count) {
  int64_t c0 = 0;
  for (; c0 + 64 <= ch; c0 += 64) gather_block<T, true>(gr, off, win, c0, ~uint64_t{0}, out, count);
  if (c0 < ch) gather_block<T, false>(gr, off, win, c0, (uint64_t{1} << (ch - c0)) - 1, out, count);
}

// The lambda carries the target too: a lambda does not inherit its function's, and it is
// inlined only once gather_walk is.
template <typename T>
SLIMTUNE_AVX512_GATHER int64_t gather_rows_avx512(const PoolGeometry& g, const T* gr, const signed char* off, T* out,
                                                  int64_t begin, int64_t end, const Cover& cover2) {
  MatchCount count;
  gather_walk(g, out, begin, end, cover2, [&](const Windows& win, T* dst) SLIMTUNE_AVX512_GATHER {
    gather_avx512<T>(gr, off, win, g.channels, dst, count);
  });
  return count.flush();
}
#pragma GCC diagnostic pop
#endif

template <typename T, typename A>
__attribute__((always_inline)) inline int64_t gather_rows_portable(const PoolGeometry& g, const T* gr,
                                                                   const signed char* off, T* out, int64_t begin,
                                                                   int64_t end, const Cover& cover2) {
  int64_t matches = 0;
  // Forced inline: each target clone of the caller must compile the step for its own target.
  gather_walk(g, out, begin, end, cover2, [&](const Windows& win, T* dst) __attribute__((always_inline)) {
    matches += gather_portable<T, A>(gr, off, win, g.channels, dst);
  });
  return matches;
}

#ifdef SLIMTUNE_MEMSAVE_AVX512
// float32 on AVX2 without AVX-512: whole blocks of 64 channels as 8 vectors of 8 lanes, the
// same sums as gather_portable in the same order (the tail block takes gather_portable itself).
// AVX2 has no masked add: a lane without a match adds +0.0 (the same bits), and a sum that is
// already a NaN is kept as it is, as the masked add of the AVX-512 path keeps it.
// SLIMTUNE_CPU_NO_AVX2 (with SLIMTUNE_CPU_NO_AVX512) takes the portable path, so an AVX2 machine
// can test the path every other machine runs.
// Returns how many offsets of the block matched.
SLIMTUNE_AVX2 __attribute__((always_inline)) inline int64_t gather_block_avx2(const float* gr,
                                                                                      const signed char* off,
                                                                                      const Windows& win, int64_t c0,
                                                                                      float* out) {
  __m256 acc[8];
  for (int v = 0; v < 8; ++v) acc[v] = _mm256_setzero_ps();
  __m256i hits = _mm256_setzero_si256();  // per lane, at most 127 per block
  for (int j = 0; j < win.n; ++j) {
    const int64_t at = win.at[j] + c0;
    const __m256i tap = _mm256_set1_epi32(win.tap[j]);
    for (int v = 0; v < 8; ++v) {
      const __m128i o8 = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(off + at + v * 8));
      const __m256i hit = _mm256_cmpeq_epi32(_mm256_cvtepi8_epi32(o8), tap);
      const __m256 add = _mm256_and_ps(_mm256_loadu_ps(gr + at + v * 8), _mm256_castsi256_ps(hit));
      const __m256 nan = _mm256_cmp_ps(acc[v], acc[v], _CMP_UNORD_Q);
      acc[v] = _mm256_blendv_ps(_mm256_add_ps(acc[v], add), acc[v], nan);
      hits = _mm256_sub_epi32(hits, hit);
    }
  }
  for (int v = 0; v < 8; ++v) _mm256_storeu_ps(out + c0 + v * 8, acc[v]);
  const __m128i h = _mm_add_epi32(_mm256_castsi256_si128(hits), _mm256_extracti128_si256(hits, 1));
  const __m128i q = _mm_add_epi32(h, _mm_shuffle_epi32(h, 0x4e));
  return _mm_cvtsi128_si32(_mm_add_epi32(q, _mm_shuffle_epi32(q, 0xb1)));
}

SLIMTUNE_AVX2 int64_t gather_rows_avx2_float(const PoolGeometry& g, const float* gr, const signed char* off,
                                                    float* out, int64_t begin, int64_t end, const Cover& cover2) {
  int64_t matches = 0;
  const int64_t ch = g.channels, whole = ch - ch % kGatherBlock;
  gather_walk(g, out, begin, end, cover2, [&](const Windows& win, float* dst) SLIMTUNE_AVX2 {
    for (int64_t c0 = 0; c0 < whole; c0 += kGatherBlock) matches += gather_block_avx2(gr, off, win, c0, dst);
    if (whole < ch) matches += gather_portable_block<float, float, 0>(gr, off, win, whole, ch - whole, dst);
  });
  return matches;
}
#endif

// The portable gather compiled for AVX2 too (never AVX-512: that is the other path, and
// SLIMTUNE_CPU_NO_AVX512 must reach this one). target_clones takes no templates: one per type.
#ifdef SLIMTUNE_MEMSAVE_AVX512
#define SLIMTUNE_PORTABLE_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define SLIMTUNE_PORTABLE_CLONES
#endif
#define SLIMTUNE_GATHER_ROWS(T, NAME)                                                                      \
  SLIMTUNE_PORTABLE_CLONES int64_t NAME(const PoolGeometry& g, const T* gr, const signed char* off, T* out, \
                                        int64_t begin, int64_t end, const Cover& cover2) {                  \
    return gather_rows_portable<T, acc_t<T>>(g, gr, off, out, begin, end, cover2);                        \
  }
SLIMTUNE_GATHER_ROWS(float, gather_rows_float)
SLIMTUNE_GATHER_ROWS(double, gather_rows_double)
SLIMTUNE_GATHER_ROWS(c10::BFloat16, gather_rows_bfloat16)
SLIMTUNE_GATHER_ROWS(c10::Half, gather_rows_half)

// The channels-last gather over input rows [begin, end); returns the offsets that matched.
template <typename T>
int64_t gather_rows(const PoolGeometry& g, const T* gr, const signed char* off, T* out, int64_t begin, int64_t end,
                    const Cover& cover2) {
#ifdef SLIMTUNE_MEMSAVE_AVX512
  if (cpu_avx512()) return gather_rows_avx512<T>(g, gr, off, out, begin, end, cover2);
  if constexpr (std::is_same_v<T, float>) {
    if (cpu_avx2()) return gather_rows_avx2_float(g, gr, off, out, begin, end, cover2);
  }
#endif
  if constexpr (std::is_same_v<T, float>) return gather_rows_float(g, gr, off, out, begin, end, cover2);
  if constexpr (std::is_same_v<T, double>) return gather_rows_double(g, gr, off, out, begin, end, cover2);
  if constexpr (std::is_same_v<T, c10::BFloat16>) return gather_rows_bfloat16(g, gr, off, out, begin, end, cover2);
  if constexpr (std::is_same_v<T, c10::Half>) return gather_rows_half(g, gr, off, out, begin, end, cover2);
}

// The planes-major scatter over planes [begin, end): straight into grad_in when T is A, else
// into `scratch` (one plane of A) rounded into grad_in plane by plane. Returns false when an
// offset leaves its window.
template <typename T, typename A>
bool scatter_planes(const PoolGeometry& g, const Taps& taps, const T* gr, const signed char* off, T* out, A* scratch,
                    int64_t begin, int64_t end) {
  const int64_t in_plane = g.in[0] * g.in[1] * g.in[2];
  const int64_t window = taps.window;  // at most 127: offsets compare as unsigned bytes
  const int64_t* disp = taps.disp.data();
  bool ok = true;
  for (int64_t unit = begin; unit < end; ++unit) {
    A* plane = std::is_same_v<T, A> ? reinterpret_cast<A*>(out + unit * in_plane) : scratch;
    std::fill(plane, plane + in_plane, A(0));
    for_each_window(g, taps, unit, unit + 1, [&](int64_t i, int64_t, const int64_t* st, int64_t corner, bool inside) {
      const uint8_t w = static_cast<uint8_t>(off[i]);
      // An offset outside the window or onto padding would write out of bounds: the op fails
      // (the glue names it).
      if (w >= window || (!inside && !taps.lands(g, w, st))) {
        ok = false;
        return;
      }
      plane[corner + disp[w]] += static_cast<A>(gr[i]);
    });
    if constexpr (!std::is_same_v<T, A>) {
      T* dst = out + unit * in_plane;
      for (int64_t e = 0; e < in_plane; ++e) dst[e] = static_cast<T>(plane[e]);
    }
  }
  return ok;
}

}  // namespace

Status maxpool_backward_cpu(const MaxpoolBackwardParams& p, void*) {
  const PoolGeometry& g = p.g;
  const signed char* off = p.offsets;
  const int64_t in_plane = g.in[0] * g.in[1] * g.in[2];
  const int64_t ch = g.channels;
  std::atomic<bool> bad{false};
  const Status st = dispatch_cpu_float(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    using A = acc_t<T>;
    const T* gr = static_cast<const T*>(p.grad);
    T* out = static_cast<T*>(p.grad_in);
    if (!g.channels_last) {
      // One plane per task: overlapping windows accumulate in order, no races.
      const Taps taps(g);
      at::parallel_for(0, g.planes, 1, [&](int64_t begin, int64_t end) {
        std::vector<A> scratch(std::is_same_v<T, A> ? 0 : static_cast<size_t>(in_plane));
        if (!scatter_planes<T, A>(g, taps, gr, off, out, scratch.data(), begin, end)) bad.store(true);
      });
      return kSuccess;
    }
    // Channels-last: input rows are independent (each position is written by its own gather).
    const Cover cover2(g, 2);
    const int64_t rows = pool_units(g) * g.in[0] * g.in[1];
    const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, g.in[2] * ch));
    std::atomic<int64_t> matches{0};
    at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
      matches += gather_rows<T>(g, gr, off, out, begin, end, cover2);
    });
    // Every valid offset matches once: fewer matches than outputs means an offset outside its
    // window or on padding (the glue names the first).
    if (matches.load() != g.planes * g.out[0] * g.out[1] * g.out[2]) bad.store(true);
    return kSuccess;
  });
  if (st != kSuccess) return st;
  return bad.load() ? kInvalidValue : kSuccess;
}

namespace {
constexpr int kBlocks = 32;  // Philox blocks per call of philox::keep_bytes (its lane count)
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
        philox::keep_bytes(p.seed, kDropoutStream, static_cast<uint64_t>(b0), kBlocks, p.threshold, keep);
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
