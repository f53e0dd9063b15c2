// dtype dispatch for the CPU kernels, over the torch-free dtype tags of common/types.h.
#pragma once
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "common/types.h"

namespace slimtune {

// The CPU's 16-bit storage types, for dispatch_storage (common/types.h).
struct CpuFloats {
  using Half = c10::Half;
  using BFloat16 = c10::BFloat16;
};

// Calls f(T{}) with the CPU storage type that `dtype` names.
template <typename F>
Status dispatch_cpu_float(DType dtype, F&& f) {
  return dispatch_storage<CpuFloats>(dtype, static_cast<F&&>(f));
}

// Index types are the same on every backend.
template <typename F>
Status dispatch_cpu_index(IndexType itype, F&& f) {
  return dispatch_index(itype, static_cast<F&&>(f));
}

}  // namespace slimtune
