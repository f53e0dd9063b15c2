#include "cuda/common.cuh"
#include "cuda/sparse_delta_linear.h"

namespace slimtune {
namespace cuda {
namespace {

// One thread per output element (t, r): consecutive threads take consecutive rows of one
// token, so the y accesses coalesce; the row's entries are read from L1/L2.
template <typename X, typename V, typename I>
__global__ void spmm_kernel(X* __restrict__ y, const X* __restrict__ x, const I* __restrict__ indices,
                            const int64_t* __restrict__ rowptr, const V* __restrict__ values, int64_t T, int64_t rows,
                            int64_t cols) {
  using A = typename Acc<X>::type;
  const int64_t n = T * rows;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(blockDim.x) * gridDim.x) {
    const int64_t t = i / rows, r = i - t * rows;
    const int64_t k0 = rowptr[r], k1 = rowptr[r + 1];
    if (k0 == k1) continue;
    const X* xt = x + t * cols;
    const int64_t base = r * cols;
    A acc = 0;
    for (int64_t k = k0; k < k1; ++k) {
      acc += static_cast<A>(to_acc(values[k])) * to_acc(xt[static_cast<int64_t>(indices[k]) - base]);
    }
    y[i] = from_acc<X>(to_acc(y[i]) + acc);
  }
}

// Thread per (entry k, token slice c): consecutive threads take consecutive entries, which
// share a row of a (broadcast) and read nearby columns of b.
template <typename X, typename I>
__global__ void sddmm_partial_kernel(const X* __restrict__ a, const X* __restrict__ b, const I* __restrict__ indices,
                                     int64_t K, int64_t T, int64_t rows, int64_t cols, int64_t slice,
                                     typename Acc<X>::type* __restrict__ partial) {
  using A = typename Acc<X>::type;
  const int64_t c = blockIdx.y;
  const int64_t t0 = c * slice;
  const int64_t t1 = t0 + slice < T ? t0 + slice : T;
  for (int64_t k = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; k < K;
       k += static_cast<int64_t>(blockDim.x) * gridDim.x) {
    const int64_t flat = static_cast<int64_t>(indices[k]);
    const int64_t r = flat / cols, col = flat - r * cols;
    A acc = 0;
    for (int64_t t = t0; t < t1; ++t) acc += to_acc(a[t * rows + r]) * to_acc(b[t * cols + col]);
    partial[c * K + k] = acc;
  }
}

template <typename A>
__global__ void sddmm_reduce_kernel(const A* __restrict__ partial, int64_t K, int64_t chunks, A* __restrict__ out) {
  for (int64_t k = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; k < K;
       k += static_cast<int64_t>(blockDim.x) * gridDim.x) {
    A s = 0;
    for (int64_t c = 0; c < chunks; ++c) s += partial[c * K + k];
    out[k] = s;
  }
}

}  // namespace

Status sparse_delta_spmm(void* y, const void* x, DType dtype, const void* indices, IndexType index_type,
                         const int64_t* rowptr, const void* values, DType value_dtype, int64_t T, int64_t rows,
                         int64_t cols, void* stream) {
  if (T == 0 || rows == 0) return 0;
  constexpr int threads = 256;
  const unsigned int blocks = blocks_for(T * rows, threads);
  auto s = static_cast<cudaStream_t>(stream);
  return dispatch_float(dtype, [&](auto x_tag) {
    using X = decltype(x_tag);
    return dispatch_index(index_type, [&](auto i_tag) {
      using I = decltype(i_tag);
      if (value_dtype == dtype) {
        spmm_kernel<X, X, I><<<blocks, threads, 0, s>>>(static_cast<X*>(y), static_cast<const X*>(x),
                                                       static_cast<const I*>(indices), rowptr,
                                                       static_cast<const X*>(values), T, rows, cols);
      } else if (value_dtype == DType::Float32) {
        spmm_kernel<X, float, I><<<blocks, threads, 0, s>>>(static_cast<X*>(y), static_cast<const X*>(x),
                                                           static_cast<const I*>(indices), rowptr,
                                                           static_cast<const float*>(values), T, rows, cols);
      } else {
        return static_cast<Status>(cudaErrorInvalidValue);
      }
      return last_status();
    });
  });
}

Status sparse_delta_sddmm(const void* a, const void* b, DType dtype, const void* indices, IndexType index_type,
                          int64_t K, int64_t T, int64_t rows, int64_t cols, void* workspace, int64_t chunks,
                          void* out, void* stream) {
  if (K == 0) return 0;
  if (chunks < 1 || chunks > 65535) return static_cast<Status>(cudaErrorInvalidValue);
  constexpr int threads = 256;
  const int64_t slice = (T + chunks - 1) / chunks;
  dim3 grid(blocks_for(K, threads, 65535u * 8u), static_cast<unsigned int>(chunks));
  auto s = static_cast<cudaStream_t>(stream);
  return dispatch_float(dtype, [&](auto x_tag) {
    using X = decltype(x_tag);
    using A = typename Acc<X>::type;
    const Status st = dispatch_index(index_type, [&](auto i_tag) {
      using I = decltype(i_tag);
      sddmm_partial_kernel<X, I><<<grid, threads, 0, s>>>(static_cast<const X*>(a), static_cast<const X*>(b),
                                                          static_cast<const I*>(indices), K, T, rows, cols, slice,
                                                          static_cast<A*>(workspace));
      return last_status();
    });
    if (st != 0) return st;
    sddmm_reduce_kernel<A><<<blocks_for(K, threads), threads, 0, s>>>(static_cast<const A*>(workspace), K, chunks,
                                                                      static_cast<A*>(out));
    return last_status();
  });
}

}  // namespace cuda
}  // namespace slimtune
