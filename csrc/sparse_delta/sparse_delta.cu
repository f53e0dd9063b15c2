// CUDA kernels of the sparse-delta family (torch-free; launched through common/launch.cuh).
#include "common/device.cuh"
#include "sparse_delta/sparse_delta.h"

namespace slimtune {
namespace sparse_delta {
namespace {

constexpr int kThreads = 256;

template <typename W, typename V, typename I>
__global__ void merge_kernel(W* __restrict__ weight, const I* __restrict__ indices, const V* __restrict__ values,
                             int64_t n, double alpha) {
  using A = acc_t<W>;
  const A a = static_cast<A>(alpha);
  for (int64_t k = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; k < n;
       k += static_cast<int64_t>(blockDim.x) * gridDim.x) {
    const int64_t pos = static_cast<int64_t>(indices[k]);
    // One rounding to W: the sum is formed in the accumulation type.
    weight[pos] = from_acc<W>(to_acc(weight[pos]) + a * static_cast<A>(to_acc(values[k])));
  }
}

// One thread per output element (t, r): consecutive threads take consecutive rows of one
// token, so the y accesses coalesce; the row's entries are read from L1/L2.
template <typename X, typename V, typename I>
__global__ void spmm_kernel(X* __restrict__ y, const X* __restrict__ x, const I* __restrict__ indices,
                            const int64_t* __restrict__ rowptr, const V* __restrict__ values, int64_t T, int64_t rows,
                            int64_t cols) {
  using A = acc_t<X>;
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
                                     acc_t<X>* __restrict__ partial) {
  using A = acc_t<X>;
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

// Thread per index k (positions [0, K)) and per rowptr entry r (positions K + r). The row of a
// valid index names the rowptr span it must lie in; with sorted indices and a non-decreasing
// rowptr from 0 to K, that makes rowptr exactly the row offsets.
template <typename I>
__global__ void validate_kernel(const I* __restrict__ indices, const int64_t* __restrict__ rowptr, int64_t K,
                                int64_t rows, int64_t cols, int64_t* __restrict__ first_bad) {
  const int64_t n = K + rows + 1;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(blockDim.x) * gridDim.x) {
    bool bad;
    if (i < K) {
      const int64_t v = static_cast<int64_t>(indices[i]);
      bad = v < 0 || v >= rows * cols || (i > 0 && static_cast<int64_t>(indices[i - 1]) >= v);
      if (!bad) {
        const int64_t r = v / cols;
        bad = !(rowptr[r] <= i && i < rowptr[r + 1]);
      }
    } else {
      const int64_t r = i - K;
      bad = (r == 0 && rowptr[0] != 0) || (r == rows && rowptr[rows] != K) || (r > 0 && rowptr[r - 1] > rowptr[r]);
    }
    // The minimum, whatever order threads run in.
    if (bad) atomicMin(reinterpret_cast<unsigned long long*>(first_bad), static_cast<unsigned long long>(i));
  }
}

}  // namespace

Status validate_cuda(const ValidateParams& p, void* stream) {
  const dim3 grid(blocks_for(p.K + p.rows + 1, kThreads));
  auto s = static_cast<cudaStream_t>(stream);
  return dispatch_index(p.index_type, [&](auto i_tag) {
    using I = decltype(i_tag);
    return launch(validate_kernel<I>, grid, dim3(kThreads), 0, s, static_cast<const I*>(p.indices), p.rowptr, p.K,
                  p.rows, p.cols, p.first_bad);
  });
}

Status merge_cuda(const MergeParams& p, void* stream) {
  if (p.n == 0) return kSuccess;
  const dim3 grid(blocks_for(p.n, kThreads));
  auto s = static_cast<cudaStream_t>(stream);
  return dispatch_float(p.weight_dtype, [&](auto w_tag) {
    using W = decltype(w_tag);
    return dispatch_index(p.index_type, [&](auto i_tag) {
      using I = decltype(i_tag);
      return dispatch_values<W>(p.value_dtype, p.weight_dtype, [&](auto v_tag) {
        using V = decltype(v_tag);
        return launch(merge_kernel<W, V, I>, grid, dim3(kThreads), 0, s, static_cast<W*>(p.weight),
                      static_cast<const I*>(p.indices), static_cast<const V*>(p.values), p.n, p.alpha);
      });
    });
  });
}

Status spmm_cuda(const SpmmParams& p, void* stream) {
  if (p.T == 0 || p.rows == 0) return kSuccess;
  const dim3 grid(blocks_for(p.T * p.rows, kThreads));
  auto s = static_cast<cudaStream_t>(stream);
  return dispatch_float(p.dtype, [&](auto x_tag) {
    using X = decltype(x_tag);
    return dispatch_index(p.index_type, [&](auto i_tag) {
      using I = decltype(i_tag);
      return dispatch_values<X>(p.value_dtype, p.dtype, [&](auto v_tag) {
        using V = decltype(v_tag);
        return launch(spmm_kernel<X, V, I>, grid, dim3(kThreads), 0, s, static_cast<X*>(p.y),
                      static_cast<const X*>(p.x), static_cast<const I*>(p.indices), p.rowptr,
                      static_cast<const V*>(p.values), p.T, p.rows, p.cols);
      });
    });
  });
}

Status sddmm_cuda(const SddmmParams& p, void* stream) {
  if (p.K == 0) return kSuccess;
  if (p.chunks < 1 || p.chunks > 65535) return kInvalidValue;
  const int64_t slice = (p.T + p.chunks - 1) / p.chunks;
  const dim3 grid(blocks_for(p.K, kThreads, 65535u * 8u), static_cast<unsigned int>(p.chunks));
  auto s = static_cast<cudaStream_t>(stream);
  return dispatch_float(p.dtype, [&](auto x_tag) {
    using X = decltype(x_tag);
    using A = acc_t<X>;
    const Status st = dispatch_index(p.index_type, [&](auto i_tag) {
      using I = decltype(i_tag);
      return launch(sddmm_partial_kernel<X, I>, grid, dim3(kThreads), 0, s, static_cast<const X*>(p.a),
                    static_cast<const X*>(p.b), static_cast<const I*>(p.indices), p.K, p.T, p.rows, p.cols, slice,
                    static_cast<A*>(p.workspace));
    });
    if (st != kSuccess) return st;
    return launch(sddmm_reduce_kernel<A>, dim3(blocks_for(p.K, kThreads)), dim3(kThreads), 0, s,
                  static_cast<const A*>(p.workspace), p.K, p.chunks, static_cast<A*>(p.out));
  });
}

}  // namespace sparse_delta
}  // namespace slimtune
