// CUDA kernels of the LoRA family (torch-free; launched through common/launch.cuh). The mask
// bits come from common/philox.h, so they equal the CPU ones.
//
// Every x-sized pass reads x once with 16-byte loads where the layout allows (contiguous rows,
// in_features a multiple of 8, 16-byte aligned), a thread taking 8 consecutive features: exactly
// one Philox block when in_features is a multiple of 8, so the mask costs one Philox call per
// 8 elements, made in registers and never stored. Other layouts take the scalar path (strided
// reads, a chunk straddling two Philox blocks). Split sums go to scratch and are reduced in a
// fixed order: no float atomics, the same bits on every run.
#include <algorithm>
#include <cstdint>

#include "common/device.cuh"
#include "common/philox.h"
#include "lora/lora.h"

namespace slimtune {
namespace lora {
namespace {

constexpr int kThreads = 256;
constexpr int kAcc = 16;  // most outputs one thread accumulates
constexpr int kChunk = philox::kElemsPerBlock;
static_assert(kChunk == 8, "a chunk of 8 features is one Philox block");
constexpr int kDownCols = 32;      // features per stage of the down-projection
constexpr int kGradTokens = 8;     // tokens per stage of the gradient pass
constexpr int kTargetBlocks = 264;  // two waves of a 132-SM GPU: enough blocks to hide latency
constexpr int kMaxSplits = 64;
// Stages a split takes at least: fewer, larger partial sums when the grid is full anyway.
constexpr int64_t kMinDownStages = 2, kMinGradStages = 4;

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
inline int64_t clamp64(int64_t v, int64_t lo, int64_t hi) { return v < lo ? lo : (v > hi ? hi : v); }
// The largest power of two <= v, within [lo, hi] (powers of two).
inline int pow2_within(int64_t v, int lo, int hi) {
  int p = lo;
  while (p * 2 <= hi && p * 2 <= v) p *= 2;
  return p;
}

struct DeviceMask {
  uint64_t seed, offset;
  uint32_t thresh;
};

__device__ __forceinline__ DeviceMask device_mask(const MaskParams& m) {
  const uint64_t seed = m.seed_ptr != nullptr ? static_cast<uint64_t>(*m.seed_ptr) : m.seed;
  return DeviceMask{seed, m.offset, m.thresh};
}

// Keep bits of mask elements e0 .. e0 + 7 (bit i for e0 + i): one Philox block when e0 is a
// multiple of 8, two when the chunk straddles blocks (in_features not a multiple of 8).
__device__ __forceinline__ uint32_t chunk_bits(const DeviceMask& m, int64_t e0) {
  if (m.thresh == 0u) return 0xFFu;
  const uint64_t b = static_cast<uint64_t>(e0) >> 3;
  const int shift = static_cast<int>(e0 & 7);
  const uint32_t lo = philox::keep_bits(philox::block(m.seed, m.offset, b), m.thresh);
  if (shift == 0) return lo;
  const uint32_t hi = philox::keep_bits(philox::block(m.seed, m.offset, b + 1), m.thresh);
  return ((lo | (hi << 8)) >> shift) & 0xFFu;
}

// dst[e] = src[e * cs] for e < n, a chunk into or out of registers: 16-byte moves when vec (then
// n == kChunk, cs == 1 and both sides 16-byte aligned).
template <typename X>
__device__ __forceinline__ void copy_chunk(const X* src, int64_t cs, int n, bool vec, X* dst) {
  if (vec) {
    const uint4* s = reinterpret_cast<const uint4*>(src);
    uint4* d = reinterpret_cast<uint4*>(dst);
#pragma unroll
    for (int i = 0; i < static_cast<int>(kChunk * sizeof(X) / 16); ++i) d[i] = s[i];
  } else {
    for (int e = 0; e < n; ++e) dst[e] = src[e * cs];
  }
}

// v[e] = keep(e) * mult * x[e] for the n < = 8 features of a chunk, 0 past them.
template <typename X, typename A>
__device__ __forceinline__ void masked_chunk(const X* src, int64_t cs, int n, bool vec, uint32_t bits, A mult, A* v) {
  alignas(16) X raw[kChunk];
  if (n > 0) copy_chunk(src, cs, n, vec, raw);
#pragma unroll
  for (int e = 0; e < kChunk; ++e) v[e] = (e < n && ((bits >> e) & 1u) != 0u) ? to_acc(raw[e]) * mult : A(0);
}

// The kAcc outputs one thread of a block accumulates: its lane of `width` (a power of two
// dividing kThreads; a token of the down-projection, a feature of the gradient pass) and ranks
// q0 + i * q_step, i < kAcc, of which each() visits those below R.
template <typename A>
struct RankOutputs {
  int lane, q0, q_step;
  A acc[kAcc];
  __device__ __forceinline__ explicit RankOutputs(int width)
      : lane(static_cast<int>(threadIdx.x) & (width - 1)),
        q0(static_cast<int>(threadIdx.x) / width),
        q_step(kThreads / width) {
#pragma unroll
    for (int i = 0; i < kAcc; ++i) acc[i] = A(0);
  }
  // f(acc of rank q, q) for each output whose rank q is below R.
  template <typename F>
  __device__ __forceinline__ void each(int R, F&& f) {
#pragma unroll
    for (int i = 0; i < kAcc; ++i) {
      const int q = q0 + i * q_step;
      if (q < R) f(acc[i], q);
    }
  }
};

// ---- down-projection: a block takes `tt` tokens and a split of the features ----

// Tokens per block (a power of two): tt * R outputs fit kAcc per thread.
inline int down_tokens(int64_t R) { return pow2_within(kThreads * kAcc / R, 1, 64); }

struct DownTiling {
  int tt;
  int64_t split_cols;
  int splits;
};

DownTiling down_tiling(int64_t T, int64_t K, int64_t R) {
  const int tt = down_tokens(R);
  const int64_t stages = ceil_div(K, kDownCols);
  const int64_t want = clamp64(ceil_div(kTargetBlocks, ceil_div(T, tt)), 1, kMaxSplits / 2);
  const int64_t per = std::max(kMinDownStages, ceil_div(stages, clamp64(want, 1, stages)));
  return DownTiling{tt, per * kDownCols, static_cast<int>(ceil_div(stages, per))};
}

template <typename X>
__global__ void __launch_bounds__(kThreads) down_kernel(DownParams p, int tt, int64_t split_cols, bool vec) {
  using A = acc_t<X>;
  SLIMTUNE_DYNAMIC_SMEM(double, smem);
  // Rows padded to kDownCols + 1: lanes reading a column of either stage hit distinct banks.
  constexpr int kRow = kDownCols + 1;
  A* xs = reinterpret_cast<A*>(smem);  // tt x kRow: the masked, scaled x stage
  A* as = xs + tt * kRow;              // R x kRow
  constexpr int kChunks = kDownCols / kChunk;
  const X* x = static_cast<const X*>(p.x);
  const A* a = static_cast<const A*>(p.a);
  const DeviceMask m = device_mask(p.mask);
  const A mult = static_cast<A>(p.mask.mult);
  const int R = static_cast<int>(p.R);
  const int64_t t0 = static_cast<int64_t>(blockIdx.x) * tt;
  const int64_t c_begin = static_cast<int64_t>(blockIdx.y) * split_cols;
  const int64_t c_end = c_begin + split_cols < p.K ? c_begin + split_cols : p.K;
  RankOutputs<A> o(tt);  // this thread's outputs: token o.lane of the block's tt
  for (int64_t c0 = c_begin; c0 < c_end; c0 += kDownCols) {
    for (int idx = threadIdx.x; idx < R * kDownCols; idx += kThreads) {
      const int q = idx / kDownCols, c = idx % kDownCols;
      as[q * kRow + c] = c0 + c < c_end ? a[q * p.K + c0 + c] : A(0);
    }
    for (int idx = threadIdx.x; idx < tt * kChunks; idx += kThreads) {
      const int r = idx / kChunks, ch = idx % kChunks;
      const int64_t t = t0 + r, col = c0 + ch * kChunk;
      const int n = t < p.T && col < c_end ? static_cast<int>(c_end - col < kChunk ? c_end - col : kChunk) : 0;
      const uint32_t bits = n > 0 ? chunk_bits(m, t * p.K + col) : 0u;
      masked_chunk(x + t * p.x_rs + col * p.x_cs, p.x_cs, n, vec && n == kChunk, bits, mult,
                   xs + r * kRow + ch * kChunk);
    }
    __syncthreads();
    const A* xr = xs + o.lane * kRow;
    o.each(R, [&](A& acc, int q) {
      const A* ar = as + q * kRow;
      A s = acc;
#pragma unroll 8
      for (int c = 0; c < kDownCols; ++c) s += xr[c] * ar[c];
      acc = s;
    });
    __syncthreads();
  }
  const int64_t t = t0 + o.lane;
  if (t >= p.T) return;
  A* out = static_cast<A*>(p.partial != nullptr ? p.partial : p.out);
  const int64_t row = p.partial != nullptr ? (blockIdx.y * p.T + t) * R : t * p.out_ld;
  o.each(R, [&](A& acc, int q) { out[row + q] = acc; });
}

// out[r * ld + c] = sum over s (in order) of part[(s * rows + r) * cols + c].
template <typename A>
__global__ void reduce_splits_kernel(const A* __restrict__ part, int splits, int64_t rows, int64_t cols,
                                     A* __restrict__ out, int64_t ld) {
  const int64_t n = rows * cols;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(blockDim.x) * gridDim.x) {
    A s = A(0);
    for (int k = 0; k < splits; ++k) s += part[k * n + i];
    const int64_t r = i / cols;
    out[r * ld + (i - r * cols)] = s;
  }
}

template <typename A>
Status reduce_splits(const void* part, int splits, int64_t rows, int64_t cols, void* out, int64_t ld,
                     cudaStream_t s) {
  return launch(reduce_splits_kernel<A>, dim3(blocks_for(rows * cols, kThreads)), dim3(kThreads), 0, s,
                static_cast<const A*>(part), splits, rows, cols, static_cast<A*>(out), ld);
}

// ---- gradient pass: a block takes kc features and a split of the tokens ----

struct GradTiling {
  int kc;
  int64_t split_tokens;
  int splits;
};

GradTiling grad_tiling(int64_t T, int64_t K, int64_t R, DType acc_dtype) {
  // R x kc outputs per block, kAcc per thread (kAcc / 2 in float64: shared memory).
  const int64_t budget = acc_dtype == DType::Float64 ? kThreads * kAcc / 2 : kThreads * kAcc;
  const int kc = pow2_within(budget / R, kChunk, kThreads);
  const int64_t steps = ceil_div(T, kGradTokens);
  const int64_t want = clamp64(ceil_div(kTargetBlocks, ceil_div(K, kc)), 1, kMaxSplits);
  const int64_t per = std::max(kMinGradStages, ceil_div(steps, clamp64(want, 1, steps)));
  return GradTiling{kc, per * kGradTokens, static_cast<int>(ceil_div(steps, per))};
}

size_t grad_smem(const GradTiling& g, int64_t R, DType acc_dtype) {
  const size_t elem = acc_dtype == DType::Float64 ? 8 : 4;
  return elem * static_cast<size_t>(R * g.kc + kGradTokens * g.kc + kGradTokens * R);
}

template <typename X>
__global__ void __launch_bounds__(kThreads) grad_kernel(GradParams p, int kc, int64_t split_tokens, bool x_vec,
                                                       bool dx_vec) {
  using A = acc_t<X>;
  SLIMTUNE_DYNAMIC_SMEM(double, smem);
  const int R = static_cast<int>(p.R);
  const int chunks = kc / kChunk;
  A* as = reinterpret_cast<A*>(smem);  // R x kc as [(q * kChunk + e) * chunks + chunk]: lanes read in a row
  A* xs = as + R * kc;                 // kGradTokens x kc: the masked, scaled x stage
  A* gs = xs + kGradTokens * kc;       // kGradTokens x R: the gb stage
  const X* x = static_cast<const X*>(p.x);
  const A* gb = static_cast<const A*>(p.gb);
  X* dx = static_cast<X*>(p.dx);
  const bool need_dA = p.dA != nullptr, need_dx = dx != nullptr;
  const DeviceMask m = device_mask(p.mask);
  const A mult = static_cast<A>(p.mask.mult);
  const int64_t K = p.K;
  const int64_t c0 = static_cast<int64_t>(blockIdx.x) * kc;
  const int64_t t_begin = static_cast<int64_t>(blockIdx.y) * split_tokens;
  const int64_t t_end = t_begin + split_tokens < p.T ? t_begin + split_tokens : p.T;
  if (need_dx) {
    const A* a = static_cast<const A*>(p.a);
    for (int idx = threadIdx.x; idx < R * kc; idx += kThreads) {
      const int q = idx / kc, c = idx % kc;
      as[(q * kChunk + c % kChunk) * chunks + c / kChunk] = c0 + c < K ? a[q * K + c0 + c] : A(0);
    }
  }
  RankOutputs<A> o(kc);  // this thread's outputs (dA): feature c0 + o.lane
  for (int64_t t0 = t_begin; t0 < t_end; t0 += kGradTokens) {
    for (int idx = threadIdx.x; idx < kGradTokens * R; idx += kThreads) {
      const int64_t t = t0 + idx / R;
      gs[idx] = t < t_end ? gb[t * p.gb_ld + idx % R] : A(0);
    }
    __syncthreads();
    for (int idx = threadIdx.x; idx < kGradTokens * chunks; idx += kThreads) {
      const int r = idx / chunks, ch = idx % chunks;
      const int64_t t = t0 + r, col = c0 + ch * kChunk;
      const int n = t < t_end && col < K ? static_cast<int>(K - col < kChunk ? K - col : kChunk) : 0;
      const uint32_t bits = n > 0 ? chunk_bits(m, t * K + col) : 0u;
      if (need_dA) {
        masked_chunk(x + t * p.x_rs + col * p.x_cs, p.x_cs, n, x_vec && n == kChunk, bits, mult,
                     xs + r * kc + ch * kChunk);
      }
      if (need_dx && n > 0) {
        A s[kChunk];
#pragma unroll
        for (int e = 0; e < kChunk; ++e) s[e] = A(0);
        for (int q = 0; q < R; ++q) {
          const A g = gs[r * R + q];
          const A* ar = as + q * kChunk * chunks + ch;
#pragma unroll
          for (int e = 0; e < kChunk; ++e) s[e] += g * ar[e * chunks];
        }
        X* d = dx + t * K + col;
        const bool vec = dx_vec && n == kChunk;
        alignas(16) X raw[kChunk];
        if (p.dx_accumulate) copy_chunk(d, 1, n, vec, raw);
#pragma unroll
        for (int e = 0; e < kChunk; ++e) {
          const A keep = ((bits >> e) & 1u) != 0u ? mult : A(0);
          const A prev = p.dx_accumulate ? static_cast<A>(to_acc(raw[e])) : A(0);
          if (e < n) raw[e] = from_acc<X>(prev + s[e] * keep);
        }
        copy_chunk(raw, 1, n, vec, d);
      }
    }
    __syncthreads();
    if (need_dA) {
      A xv[kGradTokens];
#pragma unroll
      for (int r = 0; r < kGradTokens; ++r) xv[r] = xs[r * kc + o.lane];
      o.each(R, [&](A& acc, int q) {
        A s = acc;
#pragma unroll
        for (int r = 0; r < kGradTokens; ++r) s += gs[r * R + q] * xv[r];
        acc = s;
      });
    }
    __syncthreads();
  }
  if (!need_dA) return;
  A* out = static_cast<A*>(p.partial != nullptr ? p.partial : p.dA);
  const int64_t base = p.partial != nullptr ? static_cast<int64_t>(blockIdx.y) * R * K : 0;
  const int64_t col = c0 + o.lane;
  if (col >= K) return;
  o.each(R, [&](A& acc, int q) { out[base + q * K + col] = acc; });
}

bool aligned16(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }

// 16-byte loads of 8-feature chunks: contiguous rows of a multiple of 8 features, 16-byte aligned.
bool vector_rows(const void* ptr, int64_t rs, int64_t cs, int64_t K, size_t elem) {
  return cs == 1 && K % kChunk == 0 && (rs * static_cast<int64_t>(elem)) % 16 == 0 && aligned16(ptr);
}

// Calls f(X{}) for x's storage type when the acc dtype is the one the kernels use for it.
template <typename F>
Status dispatch_x(DType x_dtype, DType acc_dtype, F&& f) {
  const DType want = x_dtype == DType::Float64 ? DType::Float64 : DType::Float32;
  if (acc_dtype != want) return kInvalidValue;
  return dispatch_float(x_dtype, std::forward<F>(f));
}

__global__ void mask_kernel(bool* __restrict__ out, int64_t n, int64_t nblocks, uint32_t thresh,
                            const int64_t* __restrict__ seed_ptr, uint64_t seed_value, uint64_t offset) {
  const uint64_t seed = seed_ptr != nullptr ? static_cast<uint64_t>(*seed_ptr) : seed_value;
  for (int64_t b = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; b < nblocks;
       b += static_cast<int64_t>(blockDim.x) * gridDim.x) {
    const uint32_t bits = thresh == 0u ? 0xFFu : philox::keep_bits(philox::block(seed, offset, b), thresh);
    for (int i = 0; i < kChunk && b * kChunk + i < n; ++i) out[b * kChunk + i] = ((bits >> i) & 1u) != 0u;
  }
}

}  // namespace

int64_t down_partial_elems_cuda(int64_t T, int64_t K, int64_t R) {
  if (T == 0 || K == 0 || R == 0) return 0;
  const DownTiling d = down_tiling(T, K, R);
  return d.splits > 1 ? d.splits * T * R : 0;
}

int64_t grad_partial_elems_cuda(int64_t T, int64_t K, int64_t R, DType acc_dtype, bool need_dA) {
  if (!need_dA || T == 0 || K == 0 || R == 0) return 0;
  const GradTiling g = grad_tiling(T, K, R, acc_dtype);
  return g.splits > 1 ? g.splits * R * K : 0;
}

Status down_cuda(const DownParams& p, void* stream) {
  if (p.R > kMaxRank || p.R < 0) return kInvalidValue;
  if (p.T == 0 || p.R == 0) return kSuccess;
  auto s = static_cast<cudaStream_t>(stream);
  if (p.K == 0) {  // an empty sum: zeros
    return dispatch_x(p.x_dtype, p.acc_dtype, [&](auto x_tag) -> Status {
      return reduce_splits<acc_t<decltype(x_tag)>>(nullptr, 0, p.T, p.R, p.out, p.out_ld, s);
    });
  }
  const DownTiling d = down_tiling(p.T, p.K, p.R);
  if ((d.splits > 1) != (p.partial != nullptr)) return kInvalidValue;
  return dispatch_x(p.x_dtype, p.acc_dtype, [&](auto x_tag) -> Status {
    using X = decltype(x_tag);
    using A = acc_t<X>;
    const size_t smem = sizeof(A) * static_cast<size_t>((d.tt + p.R) * (kDownCols + 1));
    const bool vec = vector_rows(p.x, p.x_rs, p.x_cs, p.K, sizeof(X));
    const dim3 grid(static_cast<unsigned int>(ceil_div(p.T, d.tt)), static_cast<unsigned int>(d.splits));
    Status st = launch(down_kernel<X>, grid, dim3(kThreads), smem, s, p, d.tt, d.split_cols, vec);
    if (st != kSuccess || d.splits == 1) return st;
    return reduce_splits<A>(p.partial, d.splits, p.T, p.R, p.out, p.out_ld, s);
  });
}

Status grad_cuda(const GradParams& p, void* stream) {
  if (p.R > kMaxRank || p.R < 0) return kInvalidValue;
  if (p.dots != nullptr) return kInvalidValue;  // g B comes from a GEMM here (lora.h)
  if (p.K == 0 || p.R == 0 || (p.dA == nullptr && p.dx == nullptr)) return kSuccess;
  if (p.T == 0) {
    if (p.dA == nullptr) return kSuccess;
    return dispatch_x(p.x_dtype, p.acc_dtype, [&](auto x_tag) -> Status {  // dA of no tokens: 0
      using A = acc_t<decltype(x_tag)>;
      return reduce_splits<A>(nullptr, 0, p.R, p.K, p.dA, p.K, static_cast<cudaStream_t>(stream));
    });
  }
  const GradTiling g = grad_tiling(p.T, p.K, p.R, p.acc_dtype);
  const bool split = p.dA != nullptr && g.splits > 1;
  if (split != (p.partial != nullptr)) return kInvalidValue;
  auto s = static_cast<cudaStream_t>(stream);
  return dispatch_x(p.x_dtype, p.acc_dtype, [&](auto x_tag) -> Status {
    using X = decltype(x_tag);
    using A = acc_t<X>;
    const bool x_vec = vector_rows(p.x, p.x_rs, p.x_cs, p.K, sizeof(X));
    const bool dx_vec = p.dx != nullptr && vector_rows(p.dx, p.K, 1, p.K, sizeof(X));
    const dim3 grid(static_cast<unsigned int>(ceil_div(p.K, g.kc)), static_cast<unsigned int>(g.splits));
    Status st = launch(grad_kernel<X>, grid, dim3(kThreads), grad_smem(g, p.R, p.acc_dtype), s, p, g.kc,
                       g.split_tokens, x_vec, dx_vec);
    if (st != kSuccess || !split) return st;
    return reduce_splits<A>(p.partial, g.splits, p.R, p.K, p.dA, p.K, s);
  });
}

Status dropout_mask_cuda(const DropoutMaskParams& p, void* stream) {
  if (p.n == 0) return kSuccess;
  const int64_t nb = ceil_div(p.n, kChunk);
  return launch(mask_kernel, dim3(blocks_for(nb, kThreads)), dim3(kThreads), 0, static_cast<cudaStream_t>(stream),
                p.out, p.n, nb, p.thresh, p.seed_ptr, p.seed, p.offset);
}

}  // namespace lora
}  // namespace slimtune
