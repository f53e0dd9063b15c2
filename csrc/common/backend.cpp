#include "common/backend.h"

#include <c10/util/Exception.h>

#ifdef SLIMTUNE_WITH_CUDA
// The current stream through c10's device-generic guard interface: no CUDA or ATen-CUDA
// headers, so the glue compiles against any torch.
#include <c10/core/impl/DeviceGuardImplInterface.h>
#endif

namespace slimtune {
namespace {

void* no_stream(const at::Tensor&) { return nullptr; }
bool is_cpu(const at::Tensor& t) { return t.is_cpu(); }
const char* cpu_error_string(Status status) {
  return status == kInvalidValue ? "invalid argument passed to a CPU kernel" : "CPU kernel error";
}

#ifdef SLIMTUNE_WITH_CUDA
void* cuda_stream(const at::Tensor& on) {
  const auto* impl = c10::impl::getDeviceGuardImpl(c10::DeviceType::CUDA);
  return impl->getStreamNativeHandle(impl->getStream(on.device()));
}
bool is_cuda(const at::Tensor& t) { return t.is_cuda(); }
#endif

}  // namespace

const Backend kCpuBackend{"CPU", &no_stream, &is_cpu, &cpu_error_string};

#if defined(SLIMTUNE_HOST_EMULATION)
const Backend kGpuBackend{"emulated CUDA", &no_stream, &is_cpu, &error_string};
#elif defined(SLIMTUNE_WITH_CUDA)
const Backend kGpuBackend{"CUDA", &cuda_stream, &is_cuda, &error_string};
#endif

void check_backend(const Backend& backend, const char* op, const at::Tensor& t, const char* name) {
  TORCH_CHECK(backend.holds(t), "slimtune.", op, ": argument '", name, "' is on ", t.device(),
              ", which the ", backend.name, " kernels cannot read");
}

SeedArg seed_arg(const Backend& backend, const at::Tensor& seed) {
  if (&backend == &kCpuBackend) return {static_cast<uint64_t>(seed.item<int64_t>()), nullptr};
  return {0, seed.const_data_ptr<int64_t>()};
}

void check_status(const Backend& backend, Status status, const char* op) {
  TORCH_CHECK(status == kSuccess, "slimtune.", op, ": ", backend.name, " kernel failed: ",
              backend.error_string(status));
}

}  // namespace slimtune
