// LoRA dropout kernels. They apply the Philox keep mask of common/philox.h (the same bits on
// every device) without storing it: element (i, j) of a rows x cols tile has mask index
// e_base + i * cols + j. CPU: elementwise passes over tiles of rows feeding ATen GEMMs. CUDA: the
// x-sized passes themselves (down-projection, dA and dx), each one pass over x with the mask
// made in registers; only the GEMMs with W0 stay ATen's (lora.cpp). Torch-free: nvcc and the
// host compiler both read this header. Every entry takes its params and a stream (a
// cudaStream_t; ignored on CPU).
#pragma once
#include <cstdint>

#include "common/types.h"

namespace slimtune {
namespace lora {

// Which mask elements a tile covers and what a kept element is multiplied by. thresh 0 keeps
// every element without drawing random numbers.
// seed_ptr, when set, points at the seed in device memory (read by the kernel: no host sync);
// otherwise `seed` is the seed.
struct MaskParams {
  int64_t e_base;
  double mult;
  uint32_t thresh;
  uint64_t seed;
  uint64_t offset;
  const int64_t* seed_ptr;
};

// CUDA down-projection: out[t * out_ld + q] = sum_c keep(t, c) * mult * x[t, c] * a[q * K + c]
// for t < T, q < R (mask index t * K + c from mask.e_base = 0). x: any strides, any float dtype;
// a: R x K contiguous, acc dtype (Float32 or Float64), as is out. `partial` holds
// down_partial_elems(...) acc elements of scratch (unused when that is 0).
struct DownParams {
  const void* x;
  DType x_dtype;
  int64_t x_rs, x_cs;
  int64_t T, K, R;
  const void* a;
  DType acc_dtype;
  void* out;
  int64_t out_ld;
  void* partial;
  MaskParams mask;
};

// CUDA gradient pass over x (one read, one mask for both terms):
// dA[q * K + c] = sum_t gb[t * gb_ld + q] * keep(t, c) * mult * x[t, c]   (when dA is set)
// dx[t * K + c] += keep(t, c) * mult * sum_q gb[t * gb_ld + q] * a[q * K + c]   (when dx is set)
// gb, a, dA in the acc dtype; dx contiguous in x's dtype. The sum over t is split over blocks
// and the partial sums reduced in a fixed order: deterministic. `partial`: grad_partial_elems.
struct GradParams {
  const void* x;
  DType x_dtype;
  int64_t x_rs, x_cs;
  int64_t T, K, R;
  const void* gb;
  int64_t gb_ld;
  const void* a;
  DType acc_dtype;
  void* dx;
  void* dA;
  void* partial;
  MaskParams mask;
};

// out[i, j] = keep ? x[i * x_rs + j * x_cs] * mult : 0; out contiguous, Float32 or Float64.
struct DropoutScaleParams {
  const void* x;
  DType x_dtype;
  int64_t x_rs, x_cs;
  int64_t rows, cols;
  void* out;
  DType out_dtype;
  MaskParams mask;
};

// dx[i, j] += keep ? tmp[i, j] * mult : 0; dx and tmp contiguous, tmp Float32 or Float64.
struct MaskedAddParams {
  void* dx;
  DType dx_dtype;
  const void* tmp;
  DType tmp_dtype;
  int64_t rows, cols;
  MaskParams mask;
};

// One mask for both backward terms: dx[i, j] += keep ? tmp[i, j] * mult : 0 (dx in x's dtype)
// and xd[i, j] = keep ? x[i * x_rs + j * x_cs] * mult : 0; dx, tmp, xd contiguous; tmp and xd
// share a dtype (Float32 or Float64).
struct BackwardTileParams {
  const void* x;
  DType x_dtype;
  int64_t x_rs, x_cs;
  int64_t rows, cols;
  const void* tmp;
  DType tmp_dtype;
  void* dx;
  void* xd;
  MaskParams mask;
};

// out[e] = keep(e) for e < n (bool as one byte).
struct DropoutMaskParams {
  bool* out;
  int64_t n;
  uint32_t thresh;
  uint64_t seed;
  uint64_t offset;
};

// Calls f(T{}) for the accumulation-typed tiles (Float32 or Float64).
template <typename F>
Status dispatch_acc(DType dtype, F&& f) {
  if (dtype == DType::Float32) return f(float{});
  if (dtype == DType::Float64) return f(double{});
  return kInvalidValue;
}

Status dropout_scale_cpu(const DropoutScaleParams& p, void* stream);
Status masked_add_cpu(const MaskedAddParams& p, void* stream);
Status backward_tile_cpu(const BackwardTileParams& p, void* stream);
Status dropout_mask_cpu(const DropoutMaskParams& p, void* stream);

// The widest R one CUDA launch takes (the glue splits wider stacks of adapters).
constexpr int64_t kMaxRank = 128;
// Scratch (acc elements) the CUDA passes need for their split sums; 0: none.
int64_t down_partial_elems(int64_t T, int64_t K, int64_t R);
int64_t grad_partial_elems(int64_t T, int64_t K, int64_t R, DType acc_dtype, bool need_dA);

Status down_cuda(const DownParams& p, void* stream);
Status grad_cuda(const GradParams& p, void* stream);
Status dropout_mask_cuda(const DropoutMaskParams& p, void* stream);

}  // namespace lora
}  // namespace slimtune
