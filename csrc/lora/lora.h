// LoRA kernels: the passes over x (and grad_out) around the GEMMs with W0, which stay ATen's
// (lora.cpp). They apply the Philox keep mask of common/philox.h (the same bits on every
// device) without storing it: element (t, c) of the 2-D (tokens, features) input has mask
// index t * K + c. One pass over x makes the down-projection; one pass makes both dA and dx;
// the same passes without a mask serve grad_out (g B, xa^T g). Nothing of x's size is written.
// CPU (lora_cpu.cpp) and CUDA (lora.cu) take the same params. Torch-free: nvcc and the host
// compiler both read this header. Every entry takes its params and a stream (a cudaStream_t;
// ignored on CPU).
#pragma once
#include <cstdint>

#include "common/types.h"

namespace slimtune {
namespace lora {

// Which elements are kept and what a kept element is multiplied by; thresh 0 keeps every
// element without drawing random numbers. seed_ptr, when set, points at the seed in device
// memory (read by the kernel: no host sync); otherwise `seed` is the seed.
struct MaskParams {
  double mult;
  uint32_t thresh;
  uint64_t seed;
  uint64_t offset;
  const int64_t* seed_ptr;
};

// The x operand of a pass and the adapter rows it meets: x is T x K with any strides, any float
// dtype; a is R x K contiguous in the acc dtype of x (Float64 for Float64, else Float32).
struct XOperand {
  const void* x;
  DType x_dtype;
  int64_t x_rs, x_cs;
  int64_t T, K, R;
  const void* a;
  DType acc_dtype;
};

// Down-projection: out[t * out_ld + q] = sum_c keep(t, c) * mult * x[t, c] * a[q * K + c] for
// t < T, q < R; out in the acc dtype. `partial` holds down_partial_elems_*(T, K, R) acc elements
// of scratch (null when that is 0).
struct DownParams : XOperand {
  void* out;
  int64_t out_ld;
  void* partial;
  MaskParams mask;
};

// Gradient pass over x (one read, one mask for both terms):
// dA[q * K + c] = sum_t gb[t * gb_ld + q] * keep(t, c) * mult * x[t, c]   (when dA is set)
// dx[t * K + c] (+)= keep(t, c) * mult * sum_q gb[t * gb_ld + q] * a[q * K + c]   (when dx is set)
// dx is overwritten, or added to when dx_accumulate (a second pass of a stack wider than
// kMaxRank). gb, dA in the acc dtype; a may be null when dx is; dx contiguous in x's dtype. The
// sum over t is split and the partial sums reduced in a fixed order: deterministic. `partial`:
// grad_partial_elems_*(...).
// dots[t * dots_ld + q] = sum_c x[t, c] * dots_a[q * K + c] for q < dots_R (no mask; when dots is
// set) comes from the same read of x: grad_out's g B beside xa^T g. Only the CPU's AVX-512 row
// work takes it (where grad_beats_blas_cpu holds); any other pass refuses it (kInvalidValue).
struct GradParams : XOperand {
  const void* gb;
  int64_t gb_ld;
  void* dx;
  bool dx_accumulate;
  void* dA;
  void* partial;
  MaskParams mask;
  void* dots;
  int64_t dots_ld, dots_R;
  const void* dots_a;
};

// out[e] = keep(e) for e < n (bool as one byte).
struct DropoutMaskParams {
  bool* out;
  int64_t n;
  uint32_t thresh;
  uint64_t seed;
  uint64_t offset;
  // A GPU reads the seed here, in device memory (no host sync); null: `seed` holds it.
  const int64_t* seed_ptr;
};

// The widest R one pass takes (the glue splits wider stacks of adapters).
constexpr int64_t kMaxRank = 128;
// Whether the CPU gradient pass without a mask (dropout 0) beats BLAS's GEMMs for dA and dx
// on an x of this dtype, K features and column stride x_cs, at rank R (the AVX-512 float32 row
// work does up to rank 16).
bool grad_beats_blas_cpu(DType x_dtype, int64_t K, int64_t x_cs, int64_t R);
// Scratch (acc elements) the passes need for their split sums; 0: none.
int64_t down_partial_elems_cpu(int64_t T, int64_t K, int64_t R);
int64_t grad_partial_elems_cpu(int64_t T, int64_t K, int64_t R, DType acc_dtype, bool need_dA);
int64_t down_partial_elems_cuda(int64_t T, int64_t K, int64_t R);
int64_t grad_partial_elems_cuda(int64_t T, int64_t K, int64_t R, DType acc_dtype, bool need_dA);

SLIMTUNE_KERNEL_ENTRY(down, DownParams);
SLIMTUNE_KERNEL_ENTRY(grad, GradParams);
SLIMTUNE_KERNEL_ENTRY(dropout_mask, DropoutMaskParams);

}  // namespace lora
}  // namespace slimtune
