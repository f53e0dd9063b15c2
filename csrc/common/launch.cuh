// The one way a CUDA kernel is launched in slimtune.
//
// Contract (every .cu relies on it; a host emulator relies on it too):
//   template <typename... KArgs, typename... Args>
//   Status slimtune::launch(void (*kernel)(KArgs...), dim3 grid, dim3 block, size_t smem_bytes,
//                           cudaStream_t stream, Args&&... args);
// - Normal build (nvcc): launches kernel<<<grid, block, smem_bytes, stream>>> with each argument
//   converted to the kernel's parameter type, and returns cudaGetLastError() as a Status.
// - SLIMTUNE_HOST_EMULATION defined (the .cu files compiled by a host compiler): includes
//   "slimtune_emu/runtime.h" and returns slimtune_emu::launch(kernel, grid, block, smem_bytes,
//   stream, std::forward<Args>(args)...), which runs the kernel body on the host.
// - Dynamic shared memory is declared only through SLIMTUNE_DYNAMIC_SMEM(type, name):
//   `extern __shared__ type name[]` under nvcc, `type* name = slimtune_emu::dynamic_smem<type>()`
//   under emulation.
// No other file may use the triple-chevron launch syntax.
#pragma once
#include <cstddef>
#include <utility>

#include "common/types.h"

#ifdef SLIMTUNE_HOST_EMULATION
#include "slimtune_emu/runtime.h"
#define SLIMTUNE_DYNAMIC_SMEM(type, name) type* name = slimtune_emu::dynamic_smem<type>()
#else
#include <cuda_runtime.h>
#define SLIMTUNE_DYNAMIC_SMEM(type, name) extern __shared__ type name[]
#endif

namespace slimtune {

template <typename... KArgs, typename... Args>
Status launch(void (*kernel)(KArgs...), dim3 grid, dim3 block, size_t smem_bytes, cudaStream_t stream,
              Args&&... args) {
  static_assert(sizeof...(KArgs) == sizeof...(Args), "slimtune::launch: wrong number of kernel arguments");
#ifdef SLIMTUNE_HOST_EMULATION
  return slimtune_emu::launch(kernel, grid, block, smem_bytes, stream, std::forward<Args>(args)...);
#else
  kernel<<<grid, block, smem_bytes, stream>>>(static_cast<KArgs>(std::forward<Args>(args))...);
  return static_cast<Status>(cudaGetLastError());
#endif
}

}  // namespace slimtune
