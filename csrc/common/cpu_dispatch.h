// dtype dispatch for the CPU kernels, over the torch-free dtype tags of common/types.h.
#pragma once
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "common/types.h"

namespace slimtune {

// Calls f(T{}) with the CPU storage type that `dtype` names.
template <typename F>
Status dispatch_cpu_float(DType dtype, F&& f) {
  switch (dtype) {
    case DType::Float32: return f(float{});
    case DType::Float16: return f(c10::Half{});
    case DType::BFloat16: return f(c10::BFloat16{});
    case DType::Float64: return f(double{});
  }
  return kInvalidValue;
}

template <typename F>
Status dispatch_cpu_index(IndexType itype, F&& f) {
  switch (itype) {
    case IndexType::Int32: return f(int32_t{});
    case IndexType::Int64: return f(int64_t{});
  }
  return kInvalidValue;
}

}  // namespace slimtune
