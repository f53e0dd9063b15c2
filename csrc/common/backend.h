// Where a family's driver runs its kernels: the CPU backend, and the GPU backend that runs the
// CUDA kernels (common/launch.cuh).
//
// Contract (every family's glue follows it):
// - Normal CUDA build (SLIMTUNE_WITH_CUDA): the GPU backend registers under the `slimtune`
//   library for the CUDA dispatch key; its stream is the current CUDA stream of the tensor's
//   device and it accepts CUDA tensors.
// - Host emulation (SLIMTUNE_HOST_EMULATION, without SLIMTUNE_WITH_CUDA): the glue registers
//   nothing for `slimtune` (no schemas, no CPU kernels). Its GPU backend registers under the
//   `slimtune_emu` library for the CPU dispatch key, runs the CUDA kernels (emulated) on CPU
//   tensors with a null stream. The emulator defines the library itself:
//   TORCH_LIBRARY(slimtune_emu, m) { slimtune::define_all_schemas(m); } (common/schemas.h).
// - CPU-only build: the CPU backend only.
// Each family writes its schemas once (define_<family>_schemas) and registers everything with
//   SLIMTUNE_REGISTER_FAMILY (common/register.h), which follows this contract.
#pragma once
#include <ATen/core/Tensor.h>

#include "common/types.h"

#if defined(SLIMTUNE_HOST_EMULATION) && defined(SLIMTUNE_WITH_CUDA)
#error "SLIMTUNE_HOST_EMULATION replaces the CUDA build; define only one of them"
#endif

#if defined(SLIMTUNE_HOST_EMULATION)
#define SLIMTUNE_HAS_GPU 1
#define SLIMTUNE_GPU_LIB slimtune_emu
#define SLIMTUNE_GPU_KEY CPU
#elif defined(SLIMTUNE_WITH_CUDA)
#define SLIMTUNE_HAS_GPU 1
#define SLIMTUNE_GPU_LIB slimtune
#define SLIMTUNE_GPU_KEY CUDA
#endif

namespace slimtune {

struct Backend {
  const char* name;
  // The stream kernels are queued on, as an opaque cudaStream_t (null on the CPU).
  void* (*stream)(const at::Tensor& on);
  // Whether a tensor lives where this backend's kernels can read it.
  bool (*holds)(const at::Tensor& t);
  const char* (*error_string)(Status status);
};

extern const Backend kCpuBackend;
#ifdef SLIMTUNE_HAS_GPU
extern const Backend kGpuBackend;
#endif

// Throws naming the argument unless `t` lives where this backend's kernels run (a CUDA tensor
// for the CUDA backend, a CPU tensor for the CPU and emulated backends).
void check_backend(const Backend& backend, const char* op, const at::Tensor& t, const char* name);

// Throws naming the op when a kernel entry point reports an error.
void check_status(const Backend& backend, Status status, const char* op);

// A dropout seed (a one-element int64 tensor) as a backend's kernels take it: the CPU reads its
// value here; GPU kernels read it from device memory themselves through `ptr` (no host sync).
struct SeedArg {
  uint64_t value;
  const int64_t* ptr;
};
SeedArg seed_arg(const Backend& backend, const at::Tensor& seed);

}  // namespace slimtune
