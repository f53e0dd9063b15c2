// Registering a family's ops: each op's name is written once, in the family's op list, which the
// schemas' one-device check and every backend's kernels share.
#pragma once
#include <torch/library.h>

#include <array>
#include <cstddef>

#include "common/backend.h"
#include "common/checks.h"

namespace slimtune {

// m.impl(names[i], kernels[i]) for every i: one backend's kernels, in the order of the op list.
template <std::size_t N, typename... Kernels>
void impl_ops(torch::Library& m, const std::array<const char*, N>& names, Kernels... kernels) {
  static_assert(sizeof...(Kernels) == N, "one kernel per op name");
  std::size_t i = 0;
  (m.impl(names[i++], kernels), ...);
}

}  // namespace slimtune

// A family's schemas (define_schemas(m), common/schemas.h) in the `slimtune` library, their
// Python registrations in slimtune.ops, and the one-device check before every op of `ops`.
#define SLIMTUNE_DEFINE_FAMILY(define_schemas, ops) \
  TORCH_LIBRARY_FRAGMENT(slimtune, m) {             \
    m.set_python_module("slimtune.ops");            \
    define_schemas(m);                              \
  }                                                 \
  TORCH_LIBRARY_IMPL(slimtune, BackendSelect, m) { slimtune::register_one_device_check(m, ops); }

// Every registration of a family, for the backends this build has (common/backend.h): the
// schemas, the one-device check and the CPU kernels in the `slimtune` library (none of these in
// a host-emulation build), and the GPU kernels where a GPU backend is built. `ns` is the family's
// namespace, holding its op list kOps, Bound<kernels>::register_all and kCpuKernels/kGpuKernels.
#define SLIMTUNE_REGISTER_FAMILY(define_schemas, ns) \
  SLIMTUNE_REGISTER_CPU_(define_schemas, ns)          \
  SLIMTUNE_REGISTER_GPU_(ns)

#ifndef SLIMTUNE_HOST_EMULATION
#define SLIMTUNE_REGISTER_CPU_(define_schemas, ns) \
  SLIMTUNE_DEFINE_FAMILY(define_schemas, ns::kOps) \
  TORCH_LIBRARY_IMPL(slimtune, CPU, m) { ns::Bound<ns::kCpuKernels>::register_all(m); }
#else
#define SLIMTUNE_REGISTER_CPU_(define_schemas, ns)
#endif

#ifdef SLIMTUNE_HAS_GPU
#define SLIMTUNE_REGISTER_GPU_(ns) \
  TORCH_LIBRARY_IMPL(SLIMTUNE_GPU_LIB, SLIMTUNE_GPU_KEY, m) { ns::Bound<ns::kGpuKernels>::register_all(m); }
#else
#define SLIMTUNE_REGISTER_GPU_(ns)
#endif
