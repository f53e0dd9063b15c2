// The current CUDA stream as an opaque pointer, through c10's device-generic guard
// interface: the glue then needs no CUDA or ATen-CUDA headers and compiles against any torch.
#pragma once
#include <c10/core/Device.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <c10/util/Exception.h>

#include "cuda/types.h"

namespace slimtune {

inline void* current_cuda_stream(const c10::Device& device) {
  const auto* impl = c10::impl::getDeviceGuardImpl(c10::DeviceType::CUDA);
  return impl->getStreamNativeHandle(impl->getStream(device));
}

inline void check_cuda_status(cuda::Status status, const char* op) {
  TORCH_CHECK(status == 0, "slimtune.", op, ": CUDA kernel launch failed: ", cuda::error_string(status));
}

}  // namespace slimtune
