// CUDA kernels of the memsave family (torch-free; launched through common/launch.cuh).
#include "common/device.cuh"
#include "memsave/memsave.h"

namespace slimtune {
namespace memsave {
namespace {

constexpr int kThreads = 256;

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
__global__ void relu_forward_kernel(const T* x, int64_t n, T* out, unsigned char* __restrict__ mask, int64_t nbytes) {
  for (int64_t b = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; b < nbytes;
       b += static_cast<int64_t>(blockDim.x) * gridDim.x) {
    const int64_t base = b * 8;
    const int64_t lim = (n - base) < 8 ? (n - base) : 8;
    unsigned int byte = 0;
    for (int64_t j = 0; j < lim; ++j) {
      const T v = x[base + j];
      const bool keep = !(to_acc(v) <= 0);
      out[base + j] = keep ? v : from_acc<T>(acc_t<T>(0));
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
    grad_in[i] = keep ? grad[i] : from_acc<T>(acc_t<T>(0));
  }
}

__device__ __forceinline__ void split_out(const PoolGeometry& g, int64_t o, int64_t* oc) {
  oc[2] = o % g.out[2];
  o /= g.out[2];
  oc[1] = o % g.out[1];
  oc[0] = o / g.out[1];
}

__global__ void compact_kernel(const int64_t* __restrict__ indices, signed char* __restrict__ offsets, PoolGeometry g,
                               int64_t total) {
  const int64_t per_plane = g.out[0] * g.out[1] * g.out[2];
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(blockDim.x) * gridDim.x) {
    int64_t oc[3];
    split_out(g, i % per_plane, oc);
    int64_t idx = indices[i];
    int64_t c[3];
    c[2] = idx % g.in[2];
    idx /= g.in[2];
    c[1] = idx % g.in[1];
    c[0] = idx / g.in[1];
    int64_t off = 0;
    for (int d = 0; d < 3; ++d) {
      const int64_t step = (c[d] - (oc[d] * g.stride[d] - g.padding[d])) / g.dilation[d];
      off = off * g.kernel[d] + step;
    }
    offsets[i] = static_cast<signed char>(off);
  }
}

template <typename T>
__global__ void pool_backward_kernel(const T* __restrict__ grad, const signed char* __restrict__ offsets,
                                     acc_t<T>* __restrict__ grad_in, PoolGeometry g, int64_t total) {
  const int64_t per_plane = g.out[0] * g.out[1] * g.out[2];
  const int64_t in_plane = g.in[0] * g.in[1] * g.in[2];
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(blockDim.x) * gridDim.x) {
    const int64_t plane = i / per_plane;
    int64_t oc[3];
    split_out(g, i % per_plane, oc);
    int64_t off = offsets[i];
    int64_t step[3];
    step[2] = off % g.kernel[2];
    off /= g.kernel[2];
    step[1] = off % g.kernel[1];
    step[0] = off / g.kernel[1];
    int64_t flat = 0;
    for (int d = 0; d < 3; ++d) {
      flat = flat * g.in[d] + oc[d] * g.stride[d] - g.padding[d] + step[d] * g.dilation[d];
    }
    atomicAdd(grad_in + plane * in_plane + flat, to_acc(grad[i]));
  }
}

}  // namespace

Status relu_cuda(const ReluParams& p, void* stream) {
  if (p.n == 0) return kSuccess;
  const int64_t nbytes = (p.n + 7) / 8;
  const dim3 grid(blocks_for(nbytes, kThreads));
  auto s = static_cast<cudaStream_t>(stream);
  return dispatch_float(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    if (p.out == nullptr) {
      return launch(relu_mask_kernel<T>, grid, dim3(kThreads), 0, s, static_cast<const T*>(p.x), p.n, p.mask, nbytes);
    }
    return launch(relu_forward_kernel<T>, grid, dim3(kThreads), 0, s, static_cast<const T*>(p.x), p.n,
                  static_cast<T*>(p.out), p.mask, nbytes);
  });
}

Status relu_backward_cuda(const ReluBackwardParams& p, void* stream) {
  if (p.n == 0) return kSuccess;
  const dim3 grid(blocks_for(p.n, kThreads));
  auto s = static_cast<cudaStream_t>(stream);
  return dispatch_float(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    return launch(relu_backward_kernel<T>, grid, dim3(kThreads), 0, s, static_cast<const T*>(p.grad), p.n, p.mask,
                  static_cast<T*>(p.grad_in));
  });
}

Status maxpool_compact_cuda(const MaxpoolCompactParams& p, void* stream) {
  const int64_t total = p.g.planes * p.g.out[0] * p.g.out[1] * p.g.out[2];
  if (total == 0) return kSuccess;
  return launch(compact_kernel, dim3(blocks_for(total, kThreads)), dim3(kThreads), 0,
                static_cast<cudaStream_t>(stream), p.indices, p.offsets, p.g, total);
}

Status maxpool_backward_cuda(const MaxpoolBackwardParams& p, void* stream) {
  const int64_t total = p.g.planes * p.g.out[0] * p.g.out[1] * p.g.out[2];
  if (total == 0) return kSuccess;
  const dim3 grid(blocks_for(total, kThreads));
  auto s = static_cast<cudaStream_t>(stream);
  return dispatch_float(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    return launch(pool_backward_kernel<T>, grid, dim3(kThreads), 0, s, static_cast<const T*>(p.grad), p.offsets,
                  static_cast<acc_t<T>*>(p.grad_in), p.g, total);
  });
}

}  // namespace memsave
}  // namespace slimtune
