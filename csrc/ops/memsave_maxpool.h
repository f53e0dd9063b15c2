#pragma once
#include <ATen/ATen.h>

#include "cuda/memsave_maxpool.h"

namespace slimtune {

// Validates the arguments of memsave_maxpool_{compact,backward} (`pooled` is the indices
// or the grad: shaped like the pool's output) and returns the kernel geometry.
cuda::PoolGeometry memsave_pool_geometry(const char* op, const at::Tensor& pooled, const char* pooled_name,
                                         at::IntArrayRef input_size, at::IntArrayRef kernel_size,
                                         at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation);

}  // namespace slimtune
