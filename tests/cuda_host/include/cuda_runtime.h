// Stand-in for the CUDA runtime header when the project's .cu files are compiled by g++ for the host
// SIMT emulator (tests only). Execution-space qualifiers vanish, `__shared__` becomes block storage,
// and the toolkit's own cuda_fp16.h / cuda_bf16.h (reached through -idirafter) supply the vector
// types and NVIDIA's host-side half/bfloat16 conversions, so emulated rounding is the real one.
#pragma once

// Defined before the toolkit headers: crt/host_defines.h keeps existing definitions outside nvcc.
#define __host__
#define __device__
#define __global__
#define __constant__ static
#define __launch_bounds__(...)
#define __grid_constant__
// Blocks run one at a time on one OS thread, so function-static storage is exactly "one copy per
// block, visible to all its threads". It is not refreshed between blocks (g++ drops section
// attributes on statics of templates, so the emulator cannot find it to poison it); dynamic shared
// memory is fresh and poisoned per block.
#define __shared__ static

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "slimtune_emu/errors.h"
#include "slimtune_emu/device.h"
#include "slimtune_emu/runtime.h"
