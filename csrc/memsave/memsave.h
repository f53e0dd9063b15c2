// memsave kernels: the bit-packed ReLU mask (1 bit per element) and the max-pool argmax kept
// as an int8 offset inside its window. Inputs are validated by the glue (memsave.cpp): ReLU
// tensors are dense (any dimension order; the kernels walk them in memory order), pooled
// tensors are contiguous or channels-last (PoolGeometry::channels_last). Torch-free: nvcc and
// the host compiler both read this header. Every entry takes its params and a stream (a
// cudaStream_t; ignored on CPU).
#pragma once
#include <cstdint>

#include "common/types.h"
#include "common/fast_div.h"

namespace slimtune {
namespace memsave {

// Mask bit i (byte i / 8, bit i % 8) = !(x[i] <= 0), i counting elements in memory order: where ReLU lets the gradient through (NaN
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
// kernel 1, stride 1, padding 0, dilation 1. Planes-major layout: element (plane, s0, s1, s2)
// at ((plane * n0 + s0) * n1 + s1) * n2 + s2. Channels-last (input, grad and offsets of shape
// (batch, channels, spatial...) stored batch, spatial..., channels): element (b, c, s0, s1, s2)
// at (((b * n0 + s0) * n1 + s1) * n2 + s2) * channels + c. Either way the pool's flat indices
// count over the spatial dims only (s0 * in1 + s1) * in2 + s2, as ATen's do.
struct PoolGeometry {
  int64_t planes;    // product of the non-spatial (batch, channel) dims
  int64_t channels;  // channels-last: the channel count; 1 otherwise
  bool channels_last;
  bool fast;  // in[0] * in[1] * in[2] < 2^31: div_in1/div_in2 split flat indices
  FastDiv div_in1, div_in2;
  int64_t in[3];
  int64_t out[3];
  int64_t kernel[3];
  int64_t stride[3];
  int64_t padding[3];
  int64_t dilation[3];
};

// The independent units a pool walks: planes, or batch entries when channels-last (each
// holding every channel of its spatial positions).
SLIMTUNE_HD int64_t pool_units(const PoolGeometry& g) {
  return g.channels_last ? g.planes / g.channels : g.planes;
}

// Splits flat (a spatial position of the input plane, flat < in[0] * in[1] * in[2]) into its
// coordinates c[0..2], through the fast dividers when the plane allows them.
SLIMTUNE_HD void split_spatial(const PoolGeometry& g, int64_t flat, int64_t* c) {
  int64_t rows, c0;
  if (g.fast) {
    rows = g.div_in2.div(static_cast<uint32_t>(flat));
    c0 = g.div_in1.div(static_cast<uint32_t>(rows));
  } else {
    rows = flat / g.in[2];
    c0 = rows / g.in[1];
  }
  c[0] = c0;
  c[1] = rows - c0 * g.in[1];
  c[2] = flat - rows * g.in[2];
}

// offsets[plane, o] = position of the argmax inside o's window (row-major over the window),
// from ATen's flat-over-the-plane int64 indices; planes * prod(out) entries each.
struct MaxpoolCompactParams {
  const int64_t* indices;
  signed char* offsets;
  PoolGeometry g;
};

// out = the max over each window (taps in row-major window order, padding skipped) and
// offsets = the position of its argmax inside the window, ATen's max pool's choice on CPU and
// CUDA: the first tap above all before it, a NaN taking over wherever it lies (so the last NaN
// wins). Comparisons run in the accumulation type, out is the max in the storage type. One
// pass on every backend: no int64 indices are written.
// x is laid out as g says (planes-major or channels-last), out and offsets alike.
struct MaxpoolForwardParams {
  const void* x;
  DType dtype;
  void* out;
  signed char* offsets;
  PoolGeometry g;
};

// grad_in (planes * prod(in) elements of `dtype`, grad's, every one written: zero where no
// window's argmax lands) = the sum of grad over the windows whose argmax each element is, added
// in the accumulation type from zero in ascending window order and rounded once, on every
// backend (deterministic, no atomics). Laid out as grad (g.channels_last).
struct MaxpoolBackwardParams {
  const void* grad;
  DType dtype;
  const signed char* offsets;
  void* grad_in;
  PoolGeometry g;
};

// Dropout whose mask is drawn again from its seed (forward and backward are this one op):
// out[i] = x[i] * (keep(i) ? scale : 0), i counting elements in memory order; scale is
// 1 / keep_prob formed in the accumulation type and rounded to the storage type, the product
// formed in the accumulation type and rounded once: stock dropout's arithmetic (x times a
// mask of 0 and 1 / (1 - p) in x's dtype). keep(i): the 16
// bits of Philox4x32-10 block i / 8 (key = seed, counter = (i / 8, kDropoutStream)) for lane
// i % 8 (word (i % 8) / 2, low half for even lanes) are >= threshold = round(p * 65536), as
// philox::keep_bits; p resolves to 1/65536.
constexpr uint32_t kDropoutStream = 0x4D656D53u;  // "MemS": a stream of its own for a seed
struct DropoutParams {
  const void* x;
  DType dtype;
  int64_t n;
  void* out;
  uint64_t seed;
  uint32_t threshold;
  double keep_prob;  // 1 - p
  // A GPU reads the seed here, in device memory (no host sync); null: `seed` holds it.
  const int64_t* seed_ptr;
};

SLIMTUNE_KERNEL_ENTRY(relu, ReluParams);
SLIMTUNE_KERNEL_ENTRY(relu_backward, ReluBackwardParams);
SLIMTUNE_KERNEL_ENTRY(maxpool_compact, MaxpoolCompactParams);
SLIMTUNE_KERNEL_ENTRY(maxpool_backward, MaxpoolBackwardParams);
SLIMTUNE_KERNEL_ENTRY(dropout, DropoutParams);
SLIMTUNE_KERNEL_ENTRY(maxpool_forward, MaxpoolForwardParams);

}  // namespace memsave
}  // namespace slimtune
