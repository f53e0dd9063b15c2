// Registering a family's ops: each op's name is written once, in the family's op list, which the
// schemas' one-device check and every backend's kernels share.
#pragma once
#include <torch/library.h>

#include <array>
#include <cstddef>

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
