#pragma once
#include <ATen/ATen.h>

#include <cstdint>

namespace slimtune {
namespace cpu {

// out[i, j] = keep(e) ? x[i, j] * mult : 0 with e = e_base + i * x.size(1) + j, the
// Philox mask of cuda/philox.h. x: 2-D, any strides; out: contiguous, same shape, any float dtype.
// thresh == 0 keeps everything without drawing random numbers.
void lora_dropout_scale(const at::Tensor& x, int64_t e_base, double mult, uint32_t thresh, uint64_t seed,
                        uint64_t offset, at::Tensor& out);

// dx[i, j] (+)= keep(e) ? tmp[i, j] * mult : 0, same element numbering; dx and tmp contiguous 2-D.
void lora_masked_add(at::Tensor& dx, const at::Tensor& tmp, int64_t e_base, double mult, uint32_t thresh,
                     uint64_t seed, uint64_t offset, bool accumulate);

// One mask for both backward terms: dx[i, j] += keep ? tmp[i, j] * mult : 0 and
// xd[i, j] = keep ? x[i, j] * mult : 0. dx (x's dtype), tmp and xd (compute dtype) contiguous.
void lora_dropout_backward_tile(const at::Tensor& x, const at::Tensor& tmp, at::Tensor& dx, int64_t e_base,
                                double mult, uint32_t thresh, uint64_t seed, uint64_t offset, at::Tensor& xd);

// out.view(-1)[e] = keep(e) for a contiguous bool tensor.
void lora_dropout_mask(at::Tensor& out, uint32_t thresh, uint64_t seed, uint64_t offset);

}  // namespace cpu
}  // namespace slimtune
