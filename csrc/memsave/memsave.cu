// CUDA kernels of the memsave family (torch-free; launched through common/launch.cuh).
#include "common/device.cuh"
#include "memsave/memsave.h"

namespace slimtune {
namespace memsave {
namespace {

constexpr int kThreads = 256;

// The keep bits (x > 0: -0.0 and NaN drop) of the up-to-8 elements of mask byte b; with kWrite,
// also writes relu(x) to out, element by element after reading it (out may be x).
template <bool kWrite, typename T>
__device__ __forceinline__ unsigned char relu_byte(const T* x, int64_t n, int64_t b, T* out) {
  const int64_t base = b * 8;
  const int64_t lim = (n - base) < 8 ? (n - base) : 8;
  unsigned int byte = 0;
  for (int64_t j = 0; j < lim; ++j) {
    const T v = x[base + j];
    // -0.0 and NaN are written through, as torch.relu does; only the mask drops -0.0.
    if (kWrite) out[base + j] = (to_acc(v) < 0) ? from_acc<T>(acc_t<T>(0)) : v;
    byte |= static_cast<unsigned int>(!(to_acc(v) <= 0)) << j;
  }
  return static_cast<unsigned char>(byte);
}

// One thread per output byte: no two threads write the same byte, so no atomics.
template <typename T>
__global__ void relu_mask_kernel(const T* __restrict__ x, int64_t n, unsigned char* __restrict__ mask,
                                 int64_t nbytes) {
  for (int64_t b = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; b < nbytes;
       b += static_cast<int64_t>(blockDim.x) * gridDim.x) {
    mask[b] = relu_byte<false>(x, n, b, static_cast<T*>(nullptr));
  }
}

template <typename T>
__global__ void relu_forward_kernel(const T* x, int64_t n, T* out, unsigned char* __restrict__ mask, int64_t nbytes) {
  for (int64_t b = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; b < nbytes;
       b += static_cast<int64_t>(blockDim.x) * gridDim.x) {
    mask[b] = relu_byte<true>(x, n, b, out);
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

// The window along one dim whose tap k covers input coordinate c, if there is one.
__device__ __forceinline__ bool window_at(const PoolGeometry& g, int d, int64_t c, int64_t k, int64_t* o) {
  const int64_t start = c + g.padding[d] - k * g.dilation[d];
  if (start < 0 || start % g.stride[d] != 0) return false;
  *o = start / g.stride[d];
  return *o < g.out[d];
}

// A gather, one thread per input element: it sums the gradients of the windows whose argmax it
// is, in ascending window order (the CPU kernel's order). Overlapping windows need no atomics,
// and the result is the same whatever order threads run in: deterministic, bitwise equal to CPU.
template <typename T>
__global__ void pool_backward_kernel(const T* __restrict__ grad, const signed char* __restrict__ offsets,
                                     acc_t<T>* __restrict__ grad_in, PoolGeometry g, int64_t total_in) {
  const int64_t per_plane = g.out[0] * g.out[1] * g.out[2];
  const int64_t in_plane = g.in[0] * g.in[1] * g.in[2];
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < total_in;
       e += static_cast<int64_t>(blockDim.x) * gridDim.x) {
    const int64_t plane = e / in_plane;
    int64_t rest = e - plane * in_plane;
    const int64_t c2 = rest % g.in[2];
    rest /= g.in[2];
    const int64_t c1 = rest % g.in[1], c0 = rest / g.in[1];
    const T* gr = grad + plane * per_plane;
    const signed char* off = offsets + plane * per_plane;
    acc_t<T> sum = 0;
    // Descending taps give ascending windows.
    for (int64_t k0 = g.kernel[0] - 1; k0 >= 0; --k0) {
      int64_t o0;
      if (!window_at(g, 0, c0, k0, &o0)) continue;
      for (int64_t k1 = g.kernel[1] - 1; k1 >= 0; --k1) {
        int64_t o1;
        if (!window_at(g, 1, c1, k1, &o1)) continue;
        for (int64_t k2 = g.kernel[2] - 1; k2 >= 0; --k2) {
          int64_t o2;
          if (!window_at(g, 2, c2, k2, &o2)) continue;
          const int64_t o = (o0 * g.out[1] + o1) * g.out[2] + o2;
          if (off[o] == (k0 * g.kernel[1] + k1) * g.kernel[2] + k2) sum += to_acc(gr[o]);
        }
      }
    }
    grad_in[e] += sum;
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
  const int64_t total_in = p.g.planes * p.g.in[0] * p.g.in[1] * p.g.in[2];
  if (total_in == 0) return kSuccess;
  const dim3 grid(blocks_for(total_in, kThreads));
  auto s = static_cast<cudaStream_t>(stream);
  return dispatch_float(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    return launch(pool_backward_kernel<T>, grid, dim3(kThreads), 0, s, static_cast<const T*>(p.grad), p.offsets,
                  static_cast<acc_t<T>*>(p.grad_in), p.g, total_in);
  });
}

}  // namespace memsave
}  // namespace slimtune
