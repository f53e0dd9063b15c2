// CUDA kernels of the memsave family (torch-free; launched through common/launch.cuh).
#include <cstdint>

#include "common/device.cuh"
#include "common/philox.h"
#include "memsave/memsave.h"

namespace slimtune {
namespace memsave {
namespace {

constexpr int kThreads = 256;
constexpr unsigned kFullWarp = 0xffffffffu;

// Eight consecutive elements, one mask byte's worth: 16 bytes for 16-bit types, two or four
// 16-byte loads for float and double (the launcher checks the alignment).
template <typename T>
struct alignas(16) Pack8 {
  T v[8];
};

template <typename T>
__device__ __forceinline__ T relu_value(T v) {
  // -0.0 and NaN are written through, as torch.relu does; only the mask drops -0.0.
  return (to_acc(v) < 0) ? from_acc<T>(acc_t<T>(0)) : v;
}

template <typename T>
__device__ __forceinline__ unsigned int keep_bit(T v) {
  return static_cast<unsigned int>(!(to_acc(v) <= 0));
}

// The keep bits (x > 0: -0.0 and NaN drop) of the up-to-8 elements of mask byte b, one at a
// time; with kWrite also relu(x) into out (which may be x). For unaligned data and the last,
// partial byte.
template <bool kWrite, typename T>
__device__ __forceinline__ unsigned int relu_byte(const T* x, int64_t n, int64_t b, T* out) {
  const int64_t base = b * 8;
  const int64_t lim = (n - base) < 8 ? (n - base) : 8;
  unsigned int byte = 0;
  for (int64_t j = 0; j < lim; ++j) {
    const T v = x[base + j];
    if (kWrite) out[base + j] = relu_value(v);
    byte |= keep_bit(v) << j;
  }
  return byte;
}

// The same for a whole byte through one vector load (and store).
template <bool kWrite, typename T>
__device__ __forceinline__ unsigned int relu_pack(const T* x, int64_t b, T* out) {
  const Pack8<T> in = reinterpret_cast<const Pack8<T>*>(x)[b];
  Pack8<T> res;
  unsigned int byte = 0;
#pragma unroll
  for (int j = 0; j < 8; ++j) {
    byte |= keep_bit(in.v[j]) << j;
    res.v[j] = relu_value(in.v[j]);
  }
  if (kWrite) reinterpret_cast<Pack8<T>*>(out)[b] = res;
  return byte;
}

// Lane l of a warp owns mask byte (warp base + l) and its 8 elements (vector loads); four
// lanes' bytes are gathered by shuffles into one 32-bit word that the first of them stores, so
// a warp writes 32 mask bytes as 8 coalesced words and no two threads share a byte (no atomics).
// The loop runs warp-uniform (every lane reaches every shuffle).
template <bool kWrite, typename T>
__global__ void relu_kernel(const T* x, int64_t n, T* out, unsigned char* __restrict__ mask, int64_t nbytes,
                            bool vec, bool word_stores) {
  const int lane = static_cast<int>(threadIdx.x & 31u);
  const int64_t step = static_cast<int64_t>(blockDim.x) * gridDim.x;
  const int64_t full = n / 8;  // bytes whose 8 elements all exist
  for (int64_t b0 = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x - lane; b0 < nbytes; b0 += step) {
    const int64_t b = b0 + lane;
    unsigned int byte = 0;
    if (b < full && vec) {
      byte = relu_pack<kWrite>(x, b, out);
    } else if (b < nbytes) {
      byte = relu_byte<kWrite>(x, n, b, out);
    }
    unsigned int word = byte << (8 * (lane & 3));
    word |= __shfl_down_sync(kFullWarp, word, 1);
    word |= __shfl_down_sync(kFullWarp, word, 2);
    if ((lane & 3) == 0 && b < nbytes) {
      if (word_stores && b + 4 <= nbytes) {
        reinterpret_cast<uint32_t*>(mask)[b / 4] = word;
      } else {
        for (int64_t j = 0; j < 4 && b + j < nbytes; ++j) mask[b + j] = static_cast<unsigned char>(word >> (8 * j));
      }
    }
  }
}

// The mirror image: the first lane of each four loads one 32-bit mask word, a shuffle hands
// each lane its byte, and the lane writes its 8 elements with one vector load and store.
template <typename T>
__global__ void relu_backward_kernel(const T* __restrict__ grad, int64_t n, const unsigned char* __restrict__ mask,
                                     int64_t nbytes, T* __restrict__ grad_in, bool vec, bool word_loads) {
  const int lane = static_cast<int>(threadIdx.x & 31u);
  const int64_t step = static_cast<int64_t>(blockDim.x) * gridDim.x;
  const int64_t full = n / 8;
  const T zero = from_acc<T>(acc_t<T>(0));
  for (int64_t b0 = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x - lane; b0 < nbytes; b0 += step) {
    const int64_t b = b0 + lane;
    unsigned int word = 0;
    if ((lane & 3) == 0 && b < nbytes) {
      if (word_loads && b + 4 <= nbytes) {
        word = reinterpret_cast<const uint32_t*>(mask)[b / 4];
      } else {
        for (int64_t j = 0; j < 4 && b + j < nbytes; ++j) word |= static_cast<unsigned int>(mask[b + j]) << (8 * j);
      }
    }
    const unsigned int byte = (__shfl_sync(kFullWarp, word, lane & ~3) >> (8 * (lane & 3))) & 0xffu;
    if (b < full && vec) {
      const Pack8<T> g = reinterpret_cast<const Pack8<T>*>(grad)[b];
      Pack8<T> res;
#pragma unroll
      for (int j = 0; j < 8; ++j) res.v[j] = ((byte >> j) & 1u) ? g.v[j] : zero;
      reinterpret_cast<Pack8<T>*>(grad_in)[b] = res;
    } else if (b < nbytes) {
      for (int64_t j = 0; j < 8 && b * 8 + j < n; ++j) grad_in[b * 8 + j] = ((byte >> j) & 1u) ? grad[b * 8 + j] : zero;
    }
  }
}

// ---- max pooling ----
//
// Both pooling kernels walk rows: a row is (unit, s0, s1) with unit a plane, or a batch entry
// when channels-last; its elements are (s2, channel), channel fastest. blockDim.y rows per
// block, blockDim.x threads along a row. The row index is split once per row; along the row a
// thread starts at threadIdx.x (split once per thread) and advances by blockDim.x with a carry,
// so no element pays a division for its own position.

struct RowWalk {
  int64_t q, r;    // threadIdx.x split into (s2, channel)
  int64_t dq, dr;  // blockDim.x split the same way
  int64_t ch;
  __device__ __forceinline__ explicit RowWalk(int64_t channels) : ch(channels) {
    q = threadIdx.x / ch;
    r = threadIdx.x % ch;
    dq = blockDim.x / ch;
    dr = blockDim.x % ch;
  }
  // Calls f(s2, c) for this thread's elements of a row of `len` positions along s2.
  template <typename F>
  __device__ __forceinline__ void run(int64_t len, F&& f) const {
    int64_t s2 = q, c = r;
    while (s2 < len) {
      f(s2, c);
      s2 += dq;
      c += dr;
      if (c >= ch) {
        c -= ch;
        ++s2;
      }
    }
  }
};

__global__ void compact_kernel(const int64_t* __restrict__ indices, signed char* __restrict__ offsets, PoolGeometry g,
                               int64_t rows) {
  const RowWalk walk(g.channels);
  const int64_t row_step = static_cast<int64_t>(gridDim.x) * blockDim.y;
  for (int64_t row = blockIdx.x * static_cast<int64_t>(blockDim.y) + threadIdx.y; row < rows; row += row_step) {
    const int64_t o1 = row % g.out[1], t = row / g.out[1];
    const int64_t o0 = t % g.out[0];
    const int64_t st[2] = {o0 * g.stride[0] - g.padding[0], o1 * g.stride[1] - g.padding[1]};
    const int64_t first = row * g.out[2] * g.channels;
    walk.run(g.out[2], [&](int64_t o2, int64_t c) {
      const int64_t i = first + o2 * g.channels + c;
      int64_t coord[3];
      split_spatial(g, indices[i], coord);
      const int64_t start[3] = {st[0], st[1], o2 * g.stride[2] - g.padding[2]};
      int64_t off = 0;
      for (int d = 0; d < 3; ++d) {
        const int64_t delta = coord[d] - start[d];
        off = off * g.kernel[d] + (g.dilation[d] == 1 ? delta : delta / g.dilation[d]);
      }
      offsets[i] = static_cast<signed char>(off);
    });
  }
}

// ---- max-pool forward: the max and its int8 window offset in one pass ----
//
// One thread per item: V neighbouring channels of one output position (channels-last rows whose
// channel count allows 16-byte loads), or one output (V = 1). Items run in storage order, so
// the lanes of a warp take neighbouring channels (channels-last) or neighbouring outputs of a
// row (planes-major), and item e's outputs and offsets sit at e * V.

template <typename T, int V>
struct alignas(sizeof(T) * V) Lanes {
  T v[V];
};

template <int V>
struct alignas(V) OffsetLanes {
  signed char v[V];
};

// Item e = ((unit * out0 + o0) * out1 + o1) * out2 + o2) * groups + group.
struct PoolItems {
  int64_t groups;  // channels / V: items per output position
  FastDiv div_groups, div_out2, div_out1, div_out0;
};

template <bool kFast>
__device__ __forceinline__ void split_item(const PoolGeometry& g, const PoolItems& it, int64_t e, int64_t* unit,
                                           int64_t* o, int64_t* group) {
  int64_t pos, row, plane;
  if (kFast) {  // every item index below 2^31: multiply-high dividers
    const uint32_t e32 = static_cast<uint32_t>(e);
    const uint32_t p32 = it.div_groups.div(e32);
    const uint32_t r32 = it.div_out2.div(p32);
    const uint32_t t32 = it.div_out1.div(r32);
    const uint32_t u32 = it.div_out0.div(t32);
    pos = p32;
    row = r32;
    plane = t32;
    *unit = u32;
  } else {
    pos = e / it.groups;
    row = pos / g.out[2];
    plane = row / g.out[1];
    *unit = plane / g.out[0];
  }
  *group = e - pos * it.groups;
  o[2] = pos - row * g.out[2];
  o[1] = row - plane * g.out[1];
  o[0] = plane - *unit * g.out[0];
}

// The max as the CPU form stores it (through the accumulation type with c10's conversions): the
// element itself, but a 16-bit NaN in canonical form (half: 0x7E00 with its sign; bfloat16:
// 0x7FC0), so that outputs agree bit for bit whatever NaN payload the input held.
template <typename T>
__device__ __forceinline__ T stored_max(T v) {
  return v;
}
template <>
__device__ __forceinline__ __half stored_max<__half>(__half v) {
  __half_raw r = v;
  if ((r.x & 0x7fffu) > 0x7c00u) r.x = static_cast<unsigned short>((r.x & 0x8000u) | 0x7e00u);
  return __half(r);
}
template <>
__device__ __forceinline__ __nv_bfloat16 stored_max<__nv_bfloat16>(__nv_bfloat16 v) {
  __nv_bfloat16_raw r = v;
  if ((r.x & 0x7fffu) > 0x7f80u) r.x = 0x7fc0u;
  return __nv_bfloat16(r);
}

// Taps in row-major window order, padding skipped; a tap is taken where its value (in the
// accumulation type) is above the running max or NaN, ATen's rule: the first max wins a tie,
// the last NaN wins. The output is the taken element itself (stored_max), not rounded back from float.
template <bool kFast, int V, typename T>
__global__ void pool_forward_kernel(const T* __restrict__ x, T* __restrict__ out, signed char* __restrict__ offsets,
                                    PoolGeometry g, PoolItems it, int64_t items) {
  using A = acc_t<T>;
  using L = Lanes<T, V>;
  const int64_t in_plane = g.in[0] * g.in[1] * g.in[2];
  const int64_t step = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < items; e += step) {
    int64_t unit, o[3], group;
    split_item<kFast>(g, it, e, &unit, o, &group);
    // Per dim, the window's start and its first tap inside the input (a division only on the
    // padded border with dilation).
    int64_t st[3];
    int lo[3];
    for (int d = 0; d < 3; ++d) {
      st[d] = o[d] * g.stride[d] - g.padding[d];
      const int64_t skip = st[d] >= 0 ? 0 : (g.dilation[d] == 1 ? -st[d] : (g.dilation[d] - 1 - st[d]) / g.dilation[d]);
      lo[d] = static_cast<int>(skip);
    }
    // Position p of this unit's plane holds this item's channels at xs[p * groups].
    const L* xs = reinterpret_cast<const L*>(x) + unit * in_plane * it.groups + group;
    const int64_t first = ((st[0] + lo[0] * g.dilation[0]) * g.in[1] + st[1] + lo[1] * g.dilation[1]) * g.in[2] +
                          st[2] + lo[2] * g.dilation[2];
    L top = xs[first * it.groups];
    A best[V];
    OffsetLanes<V> arg;
    const int k1n = static_cast<int>(g.kernel[1]), k2n = static_cast<int>(g.kernel[2]);
#pragma unroll
    for (int j = 0; j < V; ++j) {
      best[j] = to_acc(top.v[j]);
      arg.v[j] = static_cast<signed char>((lo[0] * k1n + lo[1]) * k2n + lo[2]);
    }
    // The first tap is compared again: a NaN there takes itself, anything else is no change.
    for (int k0 = lo[0]; k0 < g.kernel[0]; ++k0) {
      const int64_t i0 = st[0] + k0 * g.dilation[0];
      if (i0 >= g.in[0]) break;
      for (int k1 = lo[1]; k1 < k1n; ++k1) {
        const int64_t i1 = st[1] + k1 * g.dilation[1];
        if (i1 >= g.in[1]) break;
        const int64_t row = (i0 * g.in[1] + i1) * g.in[2];
        const int w_row = (k0 * k1n + k1) * k2n;
        for (int k2 = lo[2]; k2 < k2n; ++k2) {
          const int64_t i2 = st[2] + k2 * g.dilation[2];
          if (i2 >= g.in[2]) break;
          const L v = xs[(row + i2) * it.groups];
#pragma unroll
          for (int j = 0; j < V; ++j) {
            const A a = to_acc(v.v[j]);
            if (a > best[j] || a != a) {
              best[j] = a;
              top.v[j] = v.v[j];
              arg.v[j] = static_cast<signed char>(w_row + k2);
            }
          }
        }
      }
    }
#pragma unroll
    for (int j = 0; j < V; ++j) top.v[j] = stored_max(top.v[j]);
    reinterpret_cast<L*>(out)[e] = top;
    reinterpret_cast<OffsetLanes<V>*>(offsets)[e] = arg;
  }
}

// Items of V channels each, through fast dividers when every item index fits 31 bits.
template <int V, typename T>
Status launch_pool_forward(const MaxpoolForwardParams& p, int64_t positions, cudaStream_t s) {
  const PoolGeometry& g = p.g;
  PoolItems it{};
  it.groups = g.channels / V;
  const int64_t items = positions * it.groups;
  const dim3 grid(blocks_for(items, kThreads));
  const T* x = static_cast<const T*>(p.x);
  T* out = static_cast<T*>(p.out);
  if (items >= (int64_t{1} << 31)) {
    return launch(pool_forward_kernel<false, V, T>, grid, dim3(kThreads), 0, s, x, out, p.offsets, g, it, items);
  }
  it.div_groups = FastDiv(static_cast<uint32_t>(it.groups));
  it.div_out2 = FastDiv(static_cast<uint32_t>(g.out[2]));
  it.div_out1 = FastDiv(static_cast<uint32_t>(g.out[1]));
  it.div_out0 = FastDiv(static_cast<uint32_t>(g.out[0]));
  return launch(pool_forward_kernel<true, V, T>, grid, dim3(kThreads), 0, s, x, out, p.offsets, g, it, items);
}

// The windows along dim d whose taps cover input coordinate c: o in [*lo, *hi].
__device__ __forceinline__ void windows_covering(const PoolGeometry& g, int d, int64_t c, int64_t* lo, int64_t* hi) {
  const int64_t top = c + g.padding[d];  // >= 0
  const int64_t bottom = top - (g.kernel[d] - 1) * g.dilation[d];
  *hi = top / g.stride[d];
  if (*hi > g.out[d] - 1) *hi = g.out[d] - 1;
  *lo = bottom <= 0 ? 0 : (bottom + g.stride[d] - 1) / g.stride[d];
}

// The tap of window o along dim d that lands on c, or -1 when none does (dilation > 1).
__device__ __forceinline__ int64_t tap_of(const PoolGeometry& g, int d, int64_t c, int64_t o) {
  const int64_t delta = c + g.padding[d] - o * g.stride[d];
  if (g.dilation[d] == 1) return delta;
  return delta % g.dilation[d] == 0 ? delta / g.dilation[d] : -1;
}

// A gather, one thread per input element: it sums the gradients of the windows whose argmax it
// is, in ascending window order (the CPU kernel's order). Overlapping windows need no atomics,
// and the result is the same whatever order threads run in: deterministic, bitwise equal to CPU.
template <typename T>
__global__ void pool_backward_kernel(const T* __restrict__ grad, const signed char* __restrict__ offsets,
                                     T* __restrict__ grad_in, PoolGeometry g, int64_t rows) {
  const RowWalk walk(g.channels);
  const int64_t per_plane = g.out[0] * g.out[1] * g.out[2];
  const int64_t row_step = static_cast<int64_t>(gridDim.x) * blockDim.y;
  for (int64_t row = blockIdx.x * static_cast<int64_t>(blockDim.y) + threadIdx.y; row < rows; row += row_step) {
    const int64_t c1 = row % g.in[1], t = row / g.in[1];
    const int64_t c0 = t % g.in[0], unit = t / g.in[0];
    int64_t lo0, hi0, lo1, hi1;
    windows_covering(g, 0, c0, &lo0, &hi0);
    windows_covering(g, 1, c1, &lo1, &hi1);
    const int64_t first = row * g.in[2] * g.channels;
    const int64_t out_base = unit * per_plane;
    walk.run(g.in[2], [&](int64_t c2, int64_t c) {
      int64_t lo2, hi2;
      windows_covering(g, 2, c2, &lo2, &hi2);
      acc_t<T> sum = 0;
      for (int64_t o0 = lo0; o0 <= hi0; ++o0) {
        const int64_t k0 = tap_of(g, 0, c0, o0);
        if (k0 < 0) continue;
        for (int64_t o1 = lo1; o1 <= hi1; ++o1) {
          const int64_t k1 = tap_of(g, 1, c1, o1);
          if (k1 < 0) continue;
          for (int64_t o2 = lo2; o2 <= hi2; ++o2) {
            const int64_t k2 = tap_of(g, 2, c2, o2);
            if (k2 < 0) continue;
            const int64_t o = (out_base + (o0 * g.out[1] + o1) * g.out[2] + o2) * g.channels + c;
            if (offsets[o] == (k0 * g.kernel[1] + k1) * g.kernel[2] + k2) sum += to_acc(grad[o]);
          }
        }
      }
      // Rounded once, as stored: the CPU kernel's bits, with no accumulation-type pass after.
      grad_in[first + c2 * g.channels + c] = from_acc<T>(sum);
    });
  }
}

// ---- dropout ----

// One thread per Philox block: its 8 elements through one vector load and store (when aligned).
template <typename T>
__global__ void dropout_kernel(const T* __restrict__ x, int64_t n, T* __restrict__ out,
                               const int64_t* __restrict__ seed_ptr, uint64_t seed_value, uint32_t thresh,
                               double keep_prob, bool vec) {
  using A = acc_t<T>;
  const uint64_t seed = seed_ptr != nullptr ? static_cast<uint64_t>(*seed_ptr) : seed_value;
  // Stock dropout's mask value: 1 / (1 - p) in the accumulation type, rounded to T.
  const A scale = to_acc(from_acc<T>(A(1) / static_cast<A>(keep_prob)));
  const int64_t nblocks = (n + 7) / 8;
  for (int64_t b = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; b < nblocks;
       b += static_cast<int64_t>(blockDim.x) * gridDim.x) {
    const philox::U32x4 r = philox::philox4x32_10(static_cast<uint32_t>(b), static_cast<uint32_t>(b >> 32),
                                                  kDropoutStream, 0u, static_cast<uint32_t>(seed),
                                                  static_cast<uint32_t>(seed >> 32));
    const uint32_t keep = philox::keep_bits(r, thresh);
    if (vec && (b + 1) * 8 <= n) {
      const Pack8<T> in = reinterpret_cast<const Pack8<T>*>(x)[b];
      Pack8<T> res;
#pragma unroll
      for (int j = 0; j < 8; ++j) res.v[j] = from_acc<T>(to_acc(in.v[j]) * (((keep >> j) & 1u) ? scale : A(0)));
      reinterpret_cast<Pack8<T>*>(out)[b] = res;
    } else {
      for (int64_t e = b * 8; e < n && e < b * 8 + 8; ++e) {
        out[e] = from_acc<T>(to_acc(x[e]) * (((keep >> (e & 7)) & 1u) ? scale : A(0)));
      }
    }
  }
}

// Threads along a row (a multiple of 32, at most kThreads) and rows per block for rows of
// `len` elements.
dim3 row_block(int64_t len) {
  int64_t x = (len + 31) / 32 * 32;
  if (x > kThreads) x = kThreads;
  if (x < 32) x = 32;
  return dim3(static_cast<unsigned>(x), static_cast<unsigned>(kThreads / x));
}

bool aligned(const void* p, uintptr_t to) { return reinterpret_cast<uintptr_t>(p) % to == 0; }

}  // namespace

Status relu_cuda(const ReluParams& p, void* stream) {
  if (p.n == 0) return kSuccess;
  const int64_t nbytes = (p.n + 7) / 8;
  const dim3 grid(blocks_for(nbytes, kThreads));
  auto s = static_cast<cudaStream_t>(stream);
  const bool vec = aligned(p.x, 16) && (p.out == nullptr || aligned(p.out, 16));
  const bool words = aligned(p.mask, 4);
  return dispatch_float(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    if (p.out == nullptr) {
      return launch(relu_kernel<false, T>, grid, dim3(kThreads), 0, s, static_cast<const T*>(p.x), p.n,
                    static_cast<T*>(nullptr), p.mask, nbytes, vec, words);
    }
    return launch(relu_kernel<true, T>, grid, dim3(kThreads), 0, s, static_cast<const T*>(p.x), p.n,
                  static_cast<T*>(p.out), p.mask, nbytes, vec, words);
  });
}

Status relu_backward_cuda(const ReluBackwardParams& p, void* stream) {
  if (p.n == 0) return kSuccess;
  const int64_t nbytes = (p.n + 7) / 8;
  const dim3 grid(blocks_for(nbytes, kThreads));
  auto s = static_cast<cudaStream_t>(stream);
  const bool vec = aligned(p.grad, 16) && aligned(p.grad_in, 16);
  const bool words = aligned(p.mask, 4);
  return dispatch_float(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    return launch(relu_backward_kernel<T>, grid, dim3(kThreads), 0, s, static_cast<const T*>(p.grad), p.n, p.mask,
                  nbytes, static_cast<T*>(p.grad_in), vec, words);
  });
}

Status maxpool_compact_cuda(const MaxpoolCompactParams& p, void* stream) {
  const PoolGeometry& g = p.g;
  const int64_t rows = pool_units(g) * g.out[0] * g.out[1];
  if (rows == 0 || g.out[2] == 0 || g.channels == 0) return kSuccess;
  const dim3 block = row_block(g.out[2] * g.channels);
  return launch(compact_kernel, dim3(blocks_for(rows, static_cast<int>(block.y))), block, 0,
                static_cast<cudaStream_t>(stream), p.indices, p.offsets, g, rows);
}

Status maxpool_forward_cuda(const MaxpoolForwardParams& p, void* stream) {
  const PoolGeometry& g = p.g;
  const int64_t positions = pool_units(g) * g.out[0] * g.out[1] * g.out[2];
  if (positions == 0 || g.channels == 0) return kSuccess;
  auto s = static_cast<cudaStream_t>(stream);
  return dispatch_float(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    // 16 bytes of channels per load and store where channels-last rows split into such vectors.
    constexpr int kVec = static_cast<int>(16 / sizeof(T));
    const bool vec = g.channels_last && g.channels % kVec == 0 && aligned(p.x, 16) && aligned(p.out, 16) &&
                     aligned(p.offsets, kVec);
    return vec ? launch_pool_forward<kVec, T>(p, positions, s) : launch_pool_forward<1, T>(p, positions, s);
  });
}

Status maxpool_backward_cuda(const MaxpoolBackwardParams& p, void* stream) {
  const PoolGeometry& g = p.g;
  const int64_t rows = pool_units(g) * g.in[0] * g.in[1];
  if (rows == 0 || g.in[2] == 0 || g.channels == 0) return kSuccess;
  const dim3 block = row_block(g.in[2] * g.channels);
  const dim3 grid(blocks_for(rows, static_cast<int>(block.y)));
  auto s = static_cast<cudaStream_t>(stream);
  return dispatch_float(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    return launch(pool_backward_kernel<T>, grid, block, 0, s, static_cast<const T*>(p.grad), p.offsets,
                  static_cast<T*>(p.grad_in), g, rows);
  });
}

Status dropout_cuda(const DropoutParams& p, void* stream) {
  if (p.n == 0) return kSuccess;
  const int64_t nblocks = (p.n + 7) / 8;
  auto s = static_cast<cudaStream_t>(stream);
  const bool vec = aligned(p.x, 16) && aligned(p.out, 16);
  return dispatch_float(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    return launch(dropout_kernel<T>, dim3(blocks_for(nblocks, kThreads)), dim3(kThreads), 0, s,
                  static_cast<const T*>(p.x), p.n, static_cast<T*>(p.out), p.seed_ptr, p.seed, p.threshold,
                  p.keep_prob, vec);
  });
}

}  // namespace memsave
}  // namespace slimtune
