// slimtune_emu::launch: runs a __global__ function on the host the way the GPU would, block by
// block, each thread a fiber, under the schedule of slimtune_emu::config(). Launch configurations
// the GPU rejects are rejected here with the same error codes.
#pragma once
#include <cuda_runtime.h>

#include <map>
#include <mutex>
#include <numeric>
#include <tuple>
#include <utility>

#include "slimtune_emu/scheduler.h"

namespace slimtune_emu {
namespace detail {

constexpr size_t kDefaultDynamicSmem = size_t{48} << 10;  // without an opt-in
constexpr size_t kMaxDynamicSmem = size_t{227} << 10;     // sm_90's opt-in ceiling

inline std::mutex& launch_mutex() {
  static std::mutex m;
  return m;
}

// Per-kernel opt-in for more than 48 KiB of dynamic shared memory.
inline std::map<const void*, size_t>& dynamic_smem_limits() {
  static std::map<const void*, size_t> limits;
  return limits;
}

// Kernels run since the library was loaded, so tests can tell that a driver ran a kernel.
inline uint64_t& launches() {
  static uint64_t count = 0;
  return count;
}

inline std::string dims(dim3 d) {
  return "(" + std::to_string(d.x) + ", " + std::to_string(d.y) + ", " + std::to_string(d.z) + ")";
}

inline cudaError_t check_config(const void* kernel, dim3 grid, dim3 block, size_t smem, cudaStream_t stream) {
  if (grid.x == 0 || grid.y == 0 || grid.z == 0) return fail(cudaErrorInvalidConfiguration, "empty grid " + dims(grid));
  if (block.x == 0 || block.y == 0 || block.z == 0) {
    return fail(cudaErrorInvalidConfiguration, "empty block " + dims(block));
  }
  if (block.x > 1024 || block.y > 1024 || block.z > 64) {
    return fail(cudaErrorInvalidConfiguration, "block " + dims(block) + " exceeds (1024, 1024, 64)");
  }
  if (static_cast<uint64_t>(block.x) * block.y * block.z > 1024) {
    return fail(cudaErrorInvalidConfiguration, "block " + dims(block) + " has more than 1024 threads");
  }
  if (grid.x > 0x7FFFFFFFu || grid.y > 65535 || grid.z > 65535) {
    return fail(cudaErrorInvalidConfiguration, "grid " + dims(grid) + " exceeds (2^31 - 1, 65535, 65535)");
  }
  auto it = dynamic_smem_limits().find(kernel);
  const size_t limit = it == dynamic_smem_limits().end() ? kDefaultDynamicSmem : it->second;
  if (smem > limit) {
    return fail(cudaErrorInvalidValue, std::to_string(smem) + " bytes of dynamic shared memory exceed the kernel's " +
                                           std::to_string(limit) + " (raise it with cudaFuncSetAttribute)");
  }
  if (stream != nullptr) return fail(cudaErrorInvalidResourceHandle, "the emulator runs on the null stream only");
  return cudaSuccess;
}

inline cudaError_t consumed(cudaError_t e) {
  error_state.code = cudaSuccess;
  return e;
}

// Block visiting order for the schedule (blocks of a grid are independent, so any order is legal).
inline std::vector<uint64_t> block_order(uint64_t count, const Config& c, std::mt19937_64& rng) {
  std::vector<uint64_t> order(count);
  std::iota(order.begin(), order.end(), uint64_t{0});
  if (c.schedule == Schedule::Reversed) std::reverse(order.begin(), order.end());
  if (c.schedule == Schedule::Shuffled) std::shuffle(order.begin(), order.end(), rng);
  return order;
}

}  // namespace detail

// Returns the launch's error without leaving it pending for cudaGetLastError, as slimtune::launch
// does on the GPU (it reads and clears it); cudaGetErrorString(error) still explains it.
template <typename... KArgs, typename... Args>
cudaError_t launch(void (*kernel)(KArgs...), dim3 grid, dim3 block, size_t smem_bytes, cudaStream_t stream,
                   Args&&... args) {
  static_assert(sizeof...(KArgs) == sizeof...(Args), "kernel launched with the wrong number of arguments");
  using namespace detail;
  const cudaError_t bad = check_config(reinterpret_cast<const void*>(kernel), grid, block, smem_bytes, stream);
  if (bad != cudaSuccess) return consumed(bad);
  if (active != nullptr) return consumed(fail(cudaErrorLaunchFailure, "kernel launched from inside a kernel"));
  std::lock_guard<std::mutex> lock(launch_mutex());
  // Converted once, as the launch does; each thread's call copies them into its own parameters.
  std::tuple<std::decay_t<KArgs>...> params(std::forward<Args>(args)...);
  Block b;
  b.body = [&] { std::apply(kernel, params); };
  const Config cfg = config();
  b.schedule = cfg.schedule;
  b.rng.seed(cfg.seed);
  active = &b;
  gridDim = grid;
  blockDim = block;
  std::string error;
  const uint64_t count = static_cast<uint64_t>(grid.x) * grid.y * grid.z;
  for (uint64_t lin : block_order(count, cfg, b.rng)) {
    blockIdx = uint3{static_cast<unsigned>(lin % grid.x), static_cast<unsigned>((lin / grid.x) % grid.y),
                     static_cast<unsigned>(lin / (static_cast<uint64_t>(grid.x) * grid.y))};
    b.dynamic_smem.assign(smem_bytes, kPoison);
    error = run_block(b, block);
    if (!error.empty()) break;
  }
  active = nullptr;
  ++launches();
  return error.empty() ? cudaSuccess : consumed(fail(cudaErrorLaunchFailure, error));
}

}  // namespace slimtune_emu

template <typename... KArgs>
cudaError_t cudaFuncSetAttribute(void (*kernel)(KArgs...), cudaFuncAttribute attr, int value) {
  using namespace slimtune_emu::detail;
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize || value < 0 || static_cast<size_t>(value) > kMaxDynamicSmem) {
    return fail(cudaErrorInvalidValue, "cudaFuncSetAttribute: " + std::to_string(value) +
                                           " bytes of dynamic shared memory exceed 227 KiB");
  }
  std::lock_guard<std::mutex> lock(launch_mutex());
  dynamic_smem_limits()[reinterpret_cast<const void*>(kernel)] = static_cast<size_t>(value);
  return cudaSuccess;
}

extern "C" inline cudaError_t cudaMemsetAsync(void* p, int value, size_t n, cudaStream_t) {
  std::memset(p, value, n);
  return cudaSuccess;
}
