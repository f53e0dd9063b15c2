// Transitional: the families still under csrc/ops, csrc/cpu and csrc/cuda see common/types.h here.
#pragma once
#include "common/types.h"

namespace slimtune {
namespace cuda {
using slimtune::DType;
using slimtune::error_string;
using slimtune::IndexType;
using slimtune::Status;
}  // namespace cuda
}  // namespace slimtune
