// Emulated stand-in for csrc/ops/cuda_stream.h (layout before csrc/common/backend.h): the emulator
// runs every kernel on the null stream of the host, and reports failures like the real glue.
#pragma once
#include <c10/core/Device.h>
#include <c10/util/Exception.h>

#include "cuda/types.h"

namespace slimtune {

inline void* current_cuda_stream(const c10::Device&) { return nullptr; }

inline void check_cuda_status(cuda::Status status, const char* op) {
  TORCH_CHECK(status == 0, "slimtune.", op, ": CUDA kernel launch failed: ", cuda::error_string(status));
}

}  // namespace slimtune
