#include "cuda/common.cuh"
#include "cuda/memsave_bitmask.h"

namespace slimtune {
namespace cuda {
namespace {

// One thread per output byte: no two threads write the same byte, so no atomics.
template <typename T>
__global__ void relu_mask_kernel(const T* __restrict__ x, int64_t n, unsigned char* __restrict__ mask,
                                 int64_t nbytes) {
  for (int64_t b = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; b < nbytes;
       b += static_cast<int64_t>(blockDim.x) * gridDim.x) {
    const int64_t base = b * 8;
    const int64_t lim = (n - base) < 8 ? (n - base) : 8;
    unsigned int byte = 0;
    for (int64_t j = 0; j < lim; ++j) {
      byte |= static_cast<unsigned int>(!(to_acc(x[base + j]) <= 0)) << j;
    }
    mask[b] = static_cast<unsigned char>(byte);
  }
}

template <typename T>
__global__ void relu_forward_kernel(const T* x, int64_t n, T* out, unsigned char* __restrict__ mask,
                                    int64_t nbytes) {
  for (int64_t b = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; b < nbytes;
       b += static_cast<int64_t>(blockDim.x) * gridDim.x) {
    const int64_t base = b * 8;
    const int64_t lim = (n - base) < 8 ? (n - base) : 8;
    unsigned int byte = 0;
    for (int64_t j = 0; j < lim; ++j) {
      const T v = x[base + j];
      const bool keep = !(to_acc(v) <= 0);
      out[base + j] = keep ? v : from_acc<T>(typename Acc<T>::type(0));
      byte |= static_cast<unsigned int>(keep) << j;
    }
    mask[b] = static_cast<unsigned char>(byte);
  }
}

template <typename T>
__global__ void relu_backward_kernel(const T* __restrict__ grad, int64_t n, const unsigned char* __restrict__ mask,
                                     T* __restrict__ grad_in) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(blockDim.x) * gridDim.x) {
    const bool keep = (mask[i >> 3] >> (i & 7)) & 1u;
    grad_in[i] = keep ? grad[i] : from_acc<T>(typename Acc<T>::type(0));
  }
}

}  // namespace

Status memsave_relu_mask(const void* x, DType dtype, int64_t n, unsigned char* mask, void* stream) {
  if (n == 0) return 0;
  const int64_t nbytes = (n + 7) / 8;
  constexpr int threads = 256;
  const unsigned int blocks = blocks_for(nbytes, threads);
  auto s = static_cast<cudaStream_t>(stream);
  return dispatch_float(dtype, [&](auto tag) {
    using T = decltype(tag);
    relu_mask_kernel<T><<<blocks, threads, 0, s>>>(static_cast<const T*>(x), n, mask, nbytes);
    return last_status();
  });
}

Status memsave_relu_forward(const void* x, DType dtype, int64_t n, void* out, unsigned char* mask, void* stream) {
  if (n == 0) return 0;
  const int64_t nbytes = (n + 7) / 8;
  constexpr int threads = 256;
  const unsigned int blocks = blocks_for(nbytes, threads);
  auto s = static_cast<cudaStream_t>(stream);
  return dispatch_float(dtype, [&](auto tag) {
    using T = decltype(tag);
    relu_forward_kernel<T><<<blocks, threads, 0, s>>>(static_cast<const T*>(x), n, static_cast<T*>(out), mask, nbytes);
    return last_status();
  });
}

Status memsave_relu_backward(const void* grad, DType dtype, int64_t n, const unsigned char* mask, void* grad_in,
                             void* stream) {
  if (n == 0) return 0;
  constexpr int threads = 256;
  const unsigned int blocks = blocks_for(n, threads);
  auto s = static_cast<cudaStream_t>(stream);
  return dispatch_float(dtype, [&](auto tag) {
    using T = decltype(tag);
    relu_backward_kernel<T><<<blocks, threads, 0, s>>>(static_cast<const T*>(grad), n, mask, static_cast<T*>(grad_in));
    return last_status();
  });
}

}  // namespace cuda
}  // namespace slimtune
