#include "cuda/common.cuh"
#include "cuda/lora_dropout.h"
#include "cuda/philox.h"

namespace slimtune {
namespace cuda {
namespace {

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

template <typename X, typename O>
__global__ void dropout_scale_kernel(const X* __restrict__ x, int64_t x_rs, int64_t x_cs, int64_t cols,
                                     int64_t e_base, int64_t n, int64_t b0, int64_t nblocks, double mult,
                                     uint32_t thresh, uint64_t seed, uint64_t offset, O* __restrict__ out) {
  using A = typename Acc<O>::type;
  const A m = static_cast<A>(mult);
  for (int64_t k = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; k < nblocks;
       k += static_cast<int64_t>(blockDim.x) * gridDim.x) {
    int64_t first;
    uint32_t bits;
    int count;
    block_range(b0 + k, e_base, n, thresh, seed, offset, &first, &bits, &count);
    for (int c = 0; c < count; ++c) {
      const int64_t q = first + c, i = q / cols, j = q - i * cols;
      out[q] = ((bits >> c) & 1u) ? from_acc<O>(static_cast<A>(to_acc(x[i * x_rs + j * x_cs])) * m) : from_acc<O>(A(0));
    }
  }
}

template <typename D, typename T>
__global__ void masked_add_kernel(D* __restrict__ dx, const T* __restrict__ tmp, int64_t e_base, int64_t n,
                                  int64_t b0, int64_t nblocks, double mult, uint32_t thresh, uint64_t seed,
                                  uint64_t offset, bool accumulate) {
  using A = typename Acc<T>::type;
  const A m = static_cast<A>(mult);
  for (int64_t k = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; k < nblocks;
       k += static_cast<int64_t>(blockDim.x) * gridDim.x) {
    int64_t first;
    uint32_t bits;
    int count;
    block_range(b0 + k, e_base, n, thresh, seed, offset, &first, &bits, &count);
    for (int c = 0; c < count; ++c) {
      const int64_t q = first + c;
      const A add = ((bits >> c) & 1u) ? to_acc(tmp[q]) * m : A(0);
      dx[q] = from_acc<D>(accumulate ? static_cast<A>(to_acc(dx[q])) + add : add);
    }
  }
}

template <typename X, typename T>
__global__ void backward_tile_kernel(const X* __restrict__ x, int64_t x_rs, int64_t x_cs, int64_t cols,
                                     const T* __restrict__ tmp, X* __restrict__ dx, T* __restrict__ xd,
                                     int64_t e_base, int64_t n, int64_t b0, int64_t nblocks, double mult,
                                     uint32_t thresh, uint64_t seed, uint64_t offset) {
  using A = typename Acc<T>::type;
  const A m = static_cast<A>(mult);
  for (int64_t k = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; k < nblocks;
       k += static_cast<int64_t>(blockDim.x) * gridDim.x) {
    int64_t first;
    uint32_t bits;
    int count;
    block_range(b0 + k, e_base, n, thresh, seed, offset, &first, &bits, &count);
    for (int c = 0; c < count; ++c) {
      const int64_t q = first + c, i = q / cols, j = q - i * cols;
      const A keep = ((bits >> c) & 1u) ? m : A(0);
      dx[q] = from_acc<X>(static_cast<A>(to_acc(dx[q])) + to_acc(tmp[q]) * keep);
      xd[q] = from_acc<T>(static_cast<A>(to_acc(x[i * x_rs + j * x_cs])) * keep);
    }
  }
}

__global__ void mask_kernel(bool* __restrict__ out, int64_t n, int64_t nblocks, uint32_t thresh, uint64_t seed,
                            uint64_t offset) {
  for (int64_t k = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; k < nblocks;
       k += static_cast<int64_t>(blockDim.x) * gridDim.x) {
    int64_t first;
    uint32_t bits;
    int count;
    block_range(k, 0, n, thresh, seed, offset, &first, &bits, &count);
    for (int c = 0; c < count; ++c) out[first + c] = (bits >> c) & 1u;
  }
}

// Philox blocks touching [e_base, e_base + n).
inline void block_span(int64_t e_base, int64_t n, int64_t* b0, int64_t* nblocks) {
  *b0 = e_base / philox::kElemsPerBlock;
  *nblocks = (e_base + n + philox::kElemsPerBlock - 1) / philox::kElemsPerBlock - *b0;
}

constexpr int kThreads = 256;

}  // namespace

Status lora_dropout_scale(const void* x, DType x_dtype, int64_t x_rs, int64_t x_cs, int64_t rows, int64_t cols,
                          int64_t e_base, double mult, uint32_t thresh, uint64_t seed, uint64_t offset, void* out,
                          DType out_dtype, void* stream) {
  const int64_t n = rows * cols;
  if (n == 0) return 0;
  if (out_dtype != DType::Float32 && out_dtype != DType::Float64) return static_cast<Status>(cudaErrorInvalidValue);
  int64_t b0, nb;
  block_span(e_base, n, &b0, &nb);
  auto s = static_cast<cudaStream_t>(stream);
  return dispatch_float(x_dtype, [&](auto x_tag) {
    using X = decltype(x_tag);
    if (out_dtype == DType::Float32) {
      dropout_scale_kernel<X, float><<<blocks_for(nb, kThreads), kThreads, 0, s>>>(
          static_cast<const X*>(x), x_rs, x_cs, cols, e_base, n, b0, nb, mult, thresh, seed, offset,
          static_cast<float*>(out));
    } else {
      dropout_scale_kernel<X, double><<<blocks_for(nb, kThreads), kThreads, 0, s>>>(
          static_cast<const X*>(x), x_rs, x_cs, cols, e_base, n, b0, nb, mult, thresh, seed, offset,
          static_cast<double*>(out));
    }
    return last_status();
  });
}

Status lora_masked_add(void* dx, DType dx_dtype, const void* tmp, DType tmp_dtype, int64_t rows, int64_t cols,
                       int64_t e_base, double mult, uint32_t thresh, uint64_t seed, uint64_t offset, bool accumulate,
                       void* stream) {
  const int64_t n = rows * cols;
  if (n == 0) return 0;
  if (tmp_dtype != DType::Float32 && tmp_dtype != DType::Float64) return static_cast<Status>(cudaErrorInvalidValue);
  int64_t b0, nb;
  block_span(e_base, n, &b0, &nb);
  auto s = static_cast<cudaStream_t>(stream);
  return dispatch_float(dx_dtype, [&](auto d_tag) {
    using D = decltype(d_tag);
    if (tmp_dtype == DType::Float32) {
      masked_add_kernel<D, float><<<blocks_for(nb, kThreads), kThreads, 0, s>>>(
          static_cast<D*>(dx), static_cast<const float*>(tmp), e_base, n, b0, nb, mult, thresh, seed, offset,
          accumulate);
    } else {
      masked_add_kernel<D, double><<<blocks_for(nb, kThreads), kThreads, 0, s>>>(
          static_cast<D*>(dx), static_cast<const double*>(tmp), e_base, n, b0, nb, mult, thresh, seed, offset,
          accumulate);
    }
    return last_status();
  });
}

Status lora_dropout_backward_tile(const void* x, DType x_dtype, int64_t x_rs, int64_t x_cs, int64_t rows,
                                  int64_t cols, const void* tmp, DType tmp_dtype, void* dx, void* xd, int64_t e_base,
                                  double mult, uint32_t thresh, uint64_t seed, uint64_t offset, void* stream) {
  const int64_t n = rows * cols;
  if (n == 0) return 0;
  if (tmp_dtype != DType::Float32 && tmp_dtype != DType::Float64) return static_cast<Status>(cudaErrorInvalidValue);
  int64_t b0, nb;
  block_span(e_base, n, &b0, &nb);
  auto s = static_cast<cudaStream_t>(stream);
  return dispatch_float(x_dtype, [&](auto x_tag) {
    using X = decltype(x_tag);
    if (tmp_dtype == DType::Float32) {
      backward_tile_kernel<X, float><<<blocks_for(nb, kThreads), kThreads, 0, s>>>(
          static_cast<const X*>(x), x_rs, x_cs, cols, static_cast<const float*>(tmp), static_cast<X*>(dx),
          static_cast<float*>(xd), e_base, n, b0, nb, mult, thresh, seed, offset);
    } else {
      backward_tile_kernel<X, double><<<blocks_for(nb, kThreads), kThreads, 0, s>>>(
          static_cast<const X*>(x), x_rs, x_cs, cols, static_cast<const double*>(tmp), static_cast<X*>(dx),
          static_cast<double*>(xd), e_base, n, b0, nb, mult, thresh, seed, offset);
    }
    return last_status();
  });
}

Status lora_dropout_mask(bool* out, int64_t n, uint32_t thresh, uint64_t seed, uint64_t offset, void* stream) {
  if (n == 0) return 0;
  const int64_t nb = (n + philox::kElemsPerBlock - 1) / philox::kElemsPerBlock;
  mask_kernel<<<blocks_for(nb, kThreads), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(out, n, nb, thresh, seed,
                                                                                          offset);
  return last_status();
}

}  // namespace cuda
}  // namespace slimtune
