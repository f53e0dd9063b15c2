// CPU kernels of the memsave family (at::parallel_for over raw pointers).
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <vector>

#include "common/acc.h"
#include "common/cpu_dispatch.h"
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

// SLIMTUNE_CPU_NO_AVX512 (any value) takes the portable path, so a machine with AVX-512 can test
// the path every other machine runs.
bool has_avx512() {
  static const bool ok = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                         std::getenv("SLIMTUNE_CPU_NO_AVX512") == nullptr;
  return ok;
}

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
// Without AVX-512 whole vectors cover no element (vector_elements is 0): never called.
template <typename T>
void relu_vec(const Bits<T>*, Bits<T>*, uint8_t*, int64_t, int64_t) {}
template <typename U>
void relu_backward_vec(const U*, const uint8_t*, U*, int64_t, int64_t) {}
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

// Runs over n elements in chunks of whole mask bytes, so that no two tasks write one mask byte:
// per chunk, vec(first, count) over the elements whole vectors cover, then bytes(begin, end) over
// the mask bytes left.
template <typename U, typename Vec, typename Bytes>
void over_mask_bytes(int64_t n, const Vec& vec, const Bytes& bytes) {
  at::parallel_for(0, (n + 7) / 8, 4096, [&](int64_t begin, int64_t end) {
    const int64_t count = vector_elements<U>(n, begin, end);
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
    const int64_t n = p.n;
    over_mask_bytes<U>(
        n, [&](int64_t first, int64_t count) { relu_vec<T>(x, o, m, first, count); },
        [&](int64_t begin, int64_t end) { relu_bytes<T>(x, o, m, n, begin, end); });
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
    over_mask_bytes<U>(
        n, [&](int64_t first, int64_t count) { relu_backward_vec<U>(g, m, out, first, count); },
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
        for_each_window(g, taps, begin, end, [&](int64_t i, int64_t u, const int64_t* st, int64_t corner, bool inside) {
          const int64_t base = (u * in_plane + corner) * ch;
          signed char* o = off + i;
          int64_t first = 0;
          if (!inside) {
            while (!taps.lands(g, first, st)) ++first;
          }
          const T* x0 = x + base + dc[first];
          for (int64_t c = 0; c < ch; ++c) {
            m[c] = static_cast<A>(x0[c]);
            o[c] = static_cast<signed char>(first);
          }
          for (int64_t w = first + 1; w < window; ++w) {
            if (!inside && !taps.lands(g, w, st)) continue;
            tap_step(x + base + dc[w], 1, ch, m, o, static_cast<signed char>(w));
          }
          for (int64_t c = 0; c < ch; ++c) out[i + c] = static_cast<T>(m[c]);
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

Status maxpool_backward_cpu(const MaxpoolBackwardParams& p, void*) {
  const PoolGeometry& g = p.g;
  const signed char* off = p.offsets;
  const Taps taps(g);
  const int64_t in_plane = g.in[0] * g.in[1] * g.in[2];
  const int64_t ch = g.channels;
  const int64_t window = taps.window;  // at most 127: offsets compare as unsigned bytes
  std::vector<int64_t> disp_ch(taps.disp);
  for (int64_t& d : disp_ch) d *= ch;
  const int64_t* dc = disp_ch.data();
  std::atomic<bool> bad{false};
  const Status st = dispatch_cpu_float(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    using A = acc_t<T>;
    const T* gr = static_cast<const T*>(p.grad);
    A* out = static_cast<A*>(p.grad_in);
    // One plane (or batch entry) per task: overlapping windows accumulate in order, no races.
    // A plane is cleared just before its sums land in it, while it is in cache. A channels-last
    // batch entry (every channel of every position) is larger than the cache, so it is cleared
    // input row by input row, up to the last row the next window touches: windows come in row
    // order, so no cleared position is cleared again and every sum lands on a cleared one.
    at::parallel_for(0, pool_units(g), 1, [&](int64_t begin, int64_t end) {
      bool ok = true;
      for (int64_t unit = begin; unit < end; ++unit) {
        A* plane = out + unit * in_plane * ch;
        int64_t cleared = 0;  // positions of this plane set to zero
        const auto clear_to = [&](int64_t pos) {
          if (pos > cleared) {
            std::fill(plane + cleared * ch, plane + pos * ch, A(0));
            cleared = pos;
          }
        };
        if (ch == 1) clear_to(in_plane);
        for_each_window(g, taps, unit, unit + 1,
                        [&](int64_t i, int64_t u, const int64_t* st, int64_t corner, bool inside) {
          const int64_t base = (u * in_plane + corner) * ch;
          if (ch > 1) {
            const int64_t r0 = std::min(st[0] + taps.reach[0], g.in[0] - 1);
            const int64_t r1 = std::min(st[1] + taps.reach[1], g.in[1] - 1);
            clear_to(std::min(in_plane, (r0 * g.in[1] + r1 + 1) * g.in[2]));
          }
          if (inside && ch == 1) {
            const uint8_t w = static_cast<uint8_t>(off[i]);
            if (w < window) {
              out[base + dc[w]] += static_cast<A>(gr[i]);
              return;
            }
          } else if (inside) {
            // The common case: a window clear of the border, so an offset only has to be below the
            // window size; checked for all channels first (a vector compare), then a lean loop.
            bool in_range = true;
            for (int64_t c = 0; c < ch; ++c) in_range &= static_cast<uint8_t>(off[i + c]) < window;
            if (in_range) {
              for (int64_t c = 0; c < ch; ++c) out[base + dc[off[i + c]] + c] += static_cast<A>(gr[i + c]);
              return;
            }
          }
          // An offset outside the window or onto padding would write out of bounds: the op fails
          // (the glue names it), so the rest of this position is left.
          for (int64_t c = 0; c < ch; ++c) {
            const uint8_t w = static_cast<uint8_t>(off[i + c]);
            if (w >= window || !taps.lands(g, w, st)) {
              ok = false;
              return;
            }
            out[base + dc[w] + c] += static_cast<A>(gr[i + c]);
          }
        });
        clear_to(in_plane);  // positions no window reaches (a stride wider than the window)
      }
      if (!ok) bad.store(true);
    });
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
