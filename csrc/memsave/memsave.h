// memsave kernels: the bit-packed ReLU mask (1 bit per element) and the max-pool argmax kept
// as an int8 offset inside its window. Inputs are contiguous and validated by the glue
// (memsave.cpp). Torch-free: nvcc and the host compiler both read this header. Every entry
// takes its params and a stream (a cudaStream_t; ignored on CPU).
#pragma once
#include <cstdint>

#include "common/types.h"

namespace slimtune {
namespace memsave {

// Mask bit i (byte i / 8, bit i % 8) = !(x[i] <= 0): where ReLU lets the gradient through (NaN
// included, as threshold_backward does). `mask` has ceil(n / 8) bytes. When `out` is not null it
// also gets relu(x) in the same pass (it may alias x).
struct ReluParams {
  const void* x;
  DType dtype;
  int64_t n;
  void* out;
  unsigned char* mask;
};

// grad_in[i] = bit i of mask ? grad[i] : 0; grad and grad_in hold n elements of `dtype`.
struct ReluBackwardParams {
  const void* grad;
  DType dtype;
  int64_t n;
  const unsigned char* mask;
  void* grad_in;
};

// Max-pool geometry over up to three spatial dims; unused leading dims have size 1,
// kernel 1, stride 1, padding 0, dilation 1.
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
// from ATen's flat-over-the-plane int64 indices; planes * prod(out) entries each.
struct MaxpoolCompactParams {
  const int64_t* indices;
  signed char* offsets;
  PoolGeometry g;
};

// grad_in (accumulation buffer, zero-filled, planes * prod(in) elements of the accumulation
// type of `dtype`) += grad at each window's argmax, summed in ascending window order on every
// backend (deterministic, no atomics). `dtype` is grad's.
struct MaxpoolBackwardParams {
  const void* grad;
  DType dtype;
  const signed char* offsets;
  void* grad_in;
  PoolGeometry g;
};

Status relu_cpu(const ReluParams& p, void* stream);
Status relu_backward_cpu(const ReluBackwardParams& p, void* stream);
Status maxpool_compact_cpu(const MaxpoolCompactParams& p, void* stream);
Status maxpool_backward_cpu(const MaxpoolBackwardParams& p, void* stream);

Status relu_cuda(const ReluParams& p, void* stream);
Status relu_backward_cuda(const ReluBackwardParams& p, void* stream);
Status maxpool_compact_cuda(const MaxpoolCompactParams& p, void* stream);
Status maxpool_backward_cuda(const MaxpoolBackwardParams& p, void* stream);

}  // namespace memsave
}  // namespace slimtune
