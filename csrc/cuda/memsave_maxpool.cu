#include "cuda/common.cuh"
#include "cuda/memsave_maxpool.h"

namespace slimtune {
namespace cuda {
namespace {

__device__ __forceinline__ void split_out(const PoolGeometry& g, int64_t o, int64_t* oc) {
  oc[2] = o % g.out[2];
  o /= g.out[2];
  oc[1] = o % g.out[1];
  oc[0] = o / g.out[1];
}

__global__ void compact_kernel(const int64_t* __restrict__ indices, signed char* __restrict__ offsets,
                               PoolGeometry g, int64_t total) {
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
__global__ void backward_kernel(const T* __restrict__ grad, const signed char* __restrict__ offsets,
                                typename Acc<T>::type* __restrict__ grad_in, PoolGeometry g, int64_t total) {
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

Status memsave_maxpool_compact(const int64_t* indices, signed char* offsets, const PoolGeometry& g, void* stream) {
  const int64_t total = g.planes * g.out[0] * g.out[1] * g.out[2];
  if (total == 0) return 0;
  constexpr int threads = 256;
  compact_kernel<<<blocks_for(total, threads), threads, 0, static_cast<cudaStream_t>(stream)>>>(indices, offsets, g,
                                                                                               total);
  return last_status();
}

Status memsave_maxpool_backward(const void* grad, DType dtype, const signed char* offsets, void* grad_in,
                                const PoolGeometry& g, void* stream) {
  const int64_t total = g.planes * g.out[0] * g.out[1] * g.out[2];
  if (total == 0) return 0;
  constexpr int threads = 256;
  const unsigned int blocks = blocks_for(total, threads);
  auto s = static_cast<cudaStream_t>(stream);
  return dispatch_float(dtype, [&](auto tag) {
    using T = decltype(tag);
    using A = typename Acc<T>::type;
    backward_kernel<T><<<blocks, threads, 0, s>>>(static_cast<const T*>(grad), offsets, static_cast<A*>(grad_in), g,
                                                  total);
    return last_status();
  });
}

}  // namespace cuda
}  // namespace slimtune
