#pragma once
#include "cuda/types.h"

namespace slimtune {
namespace cuda {

// Max-pool geometry over up to three spatial dims; unused leading dims have size 1,
// kernel 1, stride 1, padding 0, dilation 1. Shared by the CPU and CUDA kernels.
struct PoolGeometry {
  int64_t planes;  // product of the non-spatial (batch, channel) dims
  int64_t in[3];
  int64_t out[3];
  int64_t kernel[3];
  int64_t stride[3];
  int64_t padding[3];
  int64_t dilation[3];
};

// offsets[plane, o] = position of the argmax inside o's window (row-major over the window),
// from ATen's flat-over-the-plane int64 indices. Both contiguous, planes * prod(out) entries.
Status memsave_maxpool_compact(const int64_t* indices, signed char* offsets, const PoolGeometry& g, void* stream);

// grad_in (accumulation buffer, zero-filled, planes * prod(in) of float or double) +=
// grad at each window's argmax. `dtype` is grad's; the buffer is double for Float64 and
// float otherwise. Overlapping windows accumulate with atomics.
Status memsave_maxpool_backward(const void* grad, DType dtype, const signed char* offsets, void* grad_in,
                                const PoolGeometry& g, void* stream);

}  // namespace cuda
}  // namespace slimtune
