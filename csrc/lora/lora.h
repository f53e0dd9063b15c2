// LoRA dropout kernels: elementwise passes over tiles of rows of the 2-D (tokens, features)
// input that apply the Philox keep mask of common/philox.h (the same bits on every device)
// without storing it. Element (i, j) of a rows x cols tile has mask index e_base + i * cols + j.
// The GEMMs around them are ATen's (lora.cpp). Torch-free: nvcc and the host compiler both read
// this header. Every entry takes its params and a stream (a cudaStream_t; ignored on CPU).
#pragma once
#include <cstdint>

#include "common/types.h"

namespace slimtune {
namespace lora {

// Which mask elements a tile covers and what a kept element is multiplied by. thresh 0 keeps
// every element without drawing random numbers.
struct MaskParams {
  int64_t e_base;
  double mult;
  uint32_t thresh;
  uint64_t seed;
  uint64_t offset;
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

Status dropout_scale_cuda(const DropoutScaleParams& p, void* stream);
Status masked_add_cuda(const MaskedAddParams& p, void* stream);
Status backward_tile_cuda(const BackwardTileParams& p, void* stream);
Status dropout_mask_cuda(const DropoutMaskParams& p, void* stream);

}  // namespace lora
}  // namespace slimtune
