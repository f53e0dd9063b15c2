// Division by a divisor fixed for a whole launch, as a multiply-high, add and shift: the
// pooling kernels split flat indices by the input's sizes per element, and a hardware 64-bit
// division costs tens of cycles on a CPU and far more on a GPU. Valid for numerators and
// divisors below 2^31 (the glue checks the plane size and keeps plain division otherwise).
// Host and device code, torch-free.
#pragma once
#include <cstdint>

#include "common/types.h"

namespace slimtune {

struct FastDiv {
  uint32_t d = 1;
  uint32_t m = 0;  // 2^32 * (2^s - d) / d + 1, 0 for d = 1
  uint32_t s = 0;  // ceil(log2(d))

  FastDiv() = default;
  explicit FastDiv(uint32_t divisor) : d(divisor) {
    while ((uint64_t{1} << s) < d) ++s;
    m = static_cast<uint32_t>(((uint64_t{1} << 32) * ((uint64_t{1} << s) - d)) / d + 1);
  }

  SLIMTUNE_HD uint32_t div(uint32_t n) const {
    const uint32_t hi = static_cast<uint32_t>((static_cast<uint64_t>(n) * m) >> 32);
    return (hi + n) >> s;
  }
};

}  // namespace slimtune
