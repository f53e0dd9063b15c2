// The one accumulation rule of every kernel, CPU and CUDA: float64 storage accumulates in
// float64, every other float type (float32, float16, bfloat16) in float32. Host and device code.
#pragma once
#include "common/types.h"

namespace slimtune {

template <typename T>
struct Acc {
  using type = float;
};
template <>
struct Acc<double> {
  using type = double;
};
template <typename T>
using acc_t = typename Acc<T>::type;

// The same rule on dtype tags, for the glue that allocates accumulators.
SLIMTUNE_HD constexpr DType acc_dtype(DType storage) {
  return storage == DType::Float64 ? DType::Float64 : DType::Float32;
}

}  // namespace slimtune
