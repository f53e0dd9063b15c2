// CUDA kernels of the LoRA family: the dropout passes (torch-free; launched through
// common/launch.cuh). The mask bits come from common/philox.h, so they equal the CPU ones.
#include "common/device.cuh"
#include "common/philox.h"
#include "lora/lora.h"

namespace slimtune {
namespace lora {
namespace {

constexpr int kThreads = 256;

// One thread per Philox block: 8 consecutive mask indices, clipped to [e_base, e_base + n).
// Returns the first element's position relative to e_base, the keep bits shifted to it, and the count.
__device__ __forceinline__ void block_range(int64_t b, int64_t e_base, int64_t n, uint32_t thresh, uint64_t seed,
                                            uint64_t offset, int64_t* first, uint32_t* bits, int* count) {
  const int64_t lo = max(b * philox::kElemsPerBlock, e_base);
  const int64_t hi = min((b + 1) * philox::kElemsPerBlock, e_base + n);
  *first = lo - e_base;
  *count = static_cast<int>(hi - lo);
  const uint32_t all = thresh == 0u ? 0xFFu
                                    : philox::keep_bits(philox::block(seed, offset, static_cast<uint64_t>(b)), thresh);
  *bits = all >> static_cast<int>(lo - b * philox::kElemsPerBlock);
}

// Grid-stride loop over the Philox blocks b0 .. b0 + nblocks: f(q, keep) for every element q of
// [0, n) that they cover (q relative to e_base), with its keep bit.
template <typename F>
__device__ __forceinline__ void for_each_masked(int64_t e_base, int64_t n, int64_t b0, int64_t nblocks, uint32_t thresh,
                                                uint64_t seed, uint64_t offset, F&& f) {
  for (int64_t k = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; k < nblocks;
       k += static_cast<int64_t>(blockDim.x) * gridDim.x) {
    int64_t first;
    uint32_t bits;
    int count;
    block_range(b0 + k, e_base, n, thresh, seed, offset, &first, &bits, &count);
    for (int c = 0; c < count; ++c) f(first + c, ((bits >> c) & 1u) != 0u);
  }
}

template <typename X, typename O>
__global__ void dropout_scale_kernel(const X* __restrict__ x, int64_t x_rs, int64_t x_cs, int64_t cols,
                                     int64_t e_base, int64_t n, int64_t b0, int64_t nblocks, double mult,
                                     uint32_t thresh, uint64_t seed, uint64_t offset, O* __restrict__ out) {
  using A = acc_t<O>;
  const A m = static_cast<A>(mult);
  for_each_masked(e_base, n, b0, nblocks, thresh, seed, offset, [&](int64_t q, bool keep) {
    const int64_t i = q / cols, j = q - i * cols;
    out[q] = keep ? from_acc<O>(static_cast<A>(to_acc(x[i * x_rs + j * x_cs])) * m) : from_acc<O>(A(0));
  });
}

template <typename D, typename T>
__global__ void masked_add_kernel(D* __restrict__ dx, const T* __restrict__ tmp, int64_t e_base, int64_t n,
                                  int64_t b0, int64_t nblocks, double mult, uint32_t thresh, uint64_t seed,
                                  uint64_t offset) {
  using A = acc_t<T>;
  const A m = static_cast<A>(mult);
  for_each_masked(e_base, n, b0, nblocks, thresh, seed, offset, [&](int64_t q, bool keep) {
    const A add = keep ? to_acc(tmp[q]) * m : A(0);
    dx[q] = from_acc<D>(static_cast<A>(to_acc(dx[q])) + add);
  });
}

template <typename X, typename T>
__global__ void backward_tile_kernel(const X* __restrict__ x, int64_t x_rs, int64_t x_cs, int64_t cols,
                                     const T* __restrict__ tmp, X* __restrict__ dx, T* __restrict__ xd,
                                     int64_t e_base, int64_t n, int64_t b0, int64_t nblocks, double mult,
                                     uint32_t thresh, uint64_t seed, uint64_t offset) {
  using A = acc_t<T>;
  const A m = static_cast<A>(mult);
  for_each_masked(e_base, n, b0, nblocks, thresh, seed, offset, [&](int64_t q, bool kept) {
    const int64_t i = q / cols, j = q - i * cols;
    const A keep = kept ? m : A(0);
    dx[q] = from_acc<X>(static_cast<A>(to_acc(dx[q])) + to_acc(tmp[q]) * keep);
    xd[q] = from_acc<T>(static_cast<A>(to_acc(x[i * x_rs + j * x_cs])) * keep);
  });
}

__global__ void mask_kernel(bool* __restrict__ out, int64_t n, int64_t nblocks, uint32_t thresh, uint64_t seed,
                            uint64_t offset) {
  for_each_masked(0, n, 0, nblocks, thresh, seed, offset, [&](int64_t q, bool keep) { out[q] = keep; });
}

// Philox blocks touching [e_base, e_base + n).
struct BlockSpan {
  int64_t b0, count;
};
inline BlockSpan block_span(int64_t e_base, int64_t n) {
  const int64_t b0 = e_base / philox::kElemsPerBlock;
  return {b0, (e_base + n + philox::kElemsPerBlock - 1) / philox::kElemsPerBlock - b0};
}

// Launches an elementwise masked pass over an n-element tile: f(X{}, T{}, grid, stream, span) with
// X the storage type of x_dtype and T the accumulation type of acc_dtype.
template <typename F>
Status launch_masked_tile(int64_t n, const MaskParams& mp, DType x_dtype, DType acc_dtype, void* stream, F&& f) {
  if (n == 0) return kSuccess;
  const BlockSpan span = block_span(mp.e_base, n);
  const dim3 grid(blocks_for(span.count, kThreads));
  auto s = static_cast<cudaStream_t>(stream);
  return dispatch_float(x_dtype, [&](auto x_tag) {
    return dispatch_acc(acc_dtype, [&](auto t_tag) { return f(x_tag, t_tag, grid, s, span); });
  });
}

}  // namespace

Status dropout_scale_cuda(const DropoutScaleParams& p, void* stream) {
  const int64_t n = p.rows * p.cols;
  const MaskParams& mp = p.mask;
  return launch_masked_tile(n, mp, p.x_dtype, p.out_dtype, stream,
                            [&](auto x_tag, auto o_tag, dim3 grid, cudaStream_t s, BlockSpan span) {
                              using X = decltype(x_tag);
                              using O = decltype(o_tag);
                              return launch(dropout_scale_kernel<X, O>, grid, dim3(kThreads), 0, s,
                                            static_cast<const X*>(p.x), p.x_rs, p.x_cs, p.cols, mp.e_base, n, span.b0,
                                            span.count, mp.mult, mp.thresh, mp.seed, mp.offset, static_cast<O*>(p.out));
                            });
}

Status masked_add_cuda(const MaskedAddParams& p, void* stream) {
  const int64_t n = p.rows * p.cols;
  const MaskParams& mp = p.mask;
  return launch_masked_tile(n, mp, p.dx_dtype, p.tmp_dtype, stream,
                            [&](auto d_tag, auto t_tag, dim3 grid, cudaStream_t s, BlockSpan span) {
                              using D = decltype(d_tag);
                              using T = decltype(t_tag);
                              return launch(masked_add_kernel<D, T>, grid, dim3(kThreads), 0, s, static_cast<D*>(p.dx),
                                            static_cast<const T*>(p.tmp), mp.e_base, n, span.b0, span.count, mp.mult,
                                            mp.thresh, mp.seed, mp.offset);
                            });
}

Status backward_tile_cuda(const BackwardTileParams& p, void* stream) {
  const int64_t n = p.rows * p.cols;
  const MaskParams& mp = p.mask;
  return launch_masked_tile(n, mp, p.x_dtype, p.tmp_dtype, stream,
                            [&](auto x_tag, auto t_tag, dim3 grid, cudaStream_t s, BlockSpan span) {
                              using X = decltype(x_tag);
                              using T = decltype(t_tag);
                              return launch(backward_tile_kernel<X, T>, grid, dim3(kThreads), 0, s,
                                            static_cast<const X*>(p.x), p.x_rs, p.x_cs, p.cols,
                                            static_cast<const T*>(p.tmp), static_cast<X*>(p.dx), static_cast<T*>(p.xd),
                                            mp.e_base, n, span.b0, span.count, mp.mult, mp.thresh, mp.seed, mp.offset);
                            });
}

Status dropout_mask_cuda(const DropoutMaskParams& p, void* stream) {
  if (p.n == 0) return kSuccess;
  const int64_t nb = (p.n + philox::kElemsPerBlock - 1) / philox::kElemsPerBlock;
  return launch(mask_kernel, dim3(blocks_for(nb, kThreads)), dim3(kThreads), 0, static_cast<cudaStream_t>(stream),
                p.out, p.n, nb, p.thresh, p.seed, p.offset);
}

}  // namespace lora
}  // namespace slimtune
