#pragma once
#include "cuda/types.h"

namespace slimtune {
namespace cuda {

// The LoRA dropout elementwise kernels; the mask is philox.h's, so it equals the CPU one.
// Element (i, j) of a rows x cols block has mask index e_base + i * cols + j.

// out[i, j] = keep ? x[i * x_rs + j * x_cs] * mult : 0; out contiguous (Float32 or Float64).
Status lora_dropout_scale(const void* x, DType x_dtype, int64_t x_rs, int64_t x_cs, int64_t rows, int64_t cols,
                          int64_t e_base, double mult, uint32_t thresh, uint64_t seed, uint64_t offset, void* out,
                          DType out_dtype, void* stream);

// dx[i, j] (+)= keep ? tmp[i, j] * mult : 0; dx and tmp contiguous, tmp Float32 or Float64.
Status lora_masked_add(void* dx, DType dx_dtype, const void* tmp, DType tmp_dtype, int64_t rows, int64_t cols,
                       int64_t e_base, double mult, uint32_t thresh, uint64_t seed, uint64_t offset, bool accumulate,
                       void* stream);

// One mask for both backward terms: dx[i, j] += keep ? tmp[i, j] * mult : 0 (dx in x's dtype)
// and xd[i, j] = keep ? x[i * x_rs + j * x_cs] * mult : 0; dx, tmp, xd contiguous; tmp and xd
// share a dtype (Float32 or Float64).
Status lora_dropout_backward_tile(const void* x, DType x_dtype, int64_t x_rs, int64_t x_cs, int64_t rows,
                                  int64_t cols, const void* tmp, DType tmp_dtype, void* dx, void* xd, int64_t e_base,
                                  double mult, uint32_t thresh, uint64_t seed, uint64_t offset, void* stream);

// out[e] = keep(e) for e < n (bool as one byte).
Status lora_dropout_mask(bool* out, int64_t n, uint32_t thresh, uint64_t seed, uint64_t offset, void* stream);

}  // namespace cuda
}  // namespace slimtune
