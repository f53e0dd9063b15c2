// Kernels that test the emulator itself: reductions that are right only with their barriers and
// warp exchanges, and kernels the emulator must reject. Compiled as C++ like every .cu under csrc/.
#include <cuda_runtime.h>

#include <cstring>
#include <string>

#include "selftest.h"

namespace slimtune_emu {
namespace selftest {
namespace {

constexpr int kMaxThreads = 1024;

// Block sums into out[blockIdx.x]: the textbook shared-memory tree (blockDim.x a power of two) over
// the block's slots s. Without load_barrier, a thread may add a partner's slot before the partner
// stored it.
__device__ void tree_sum(float* s, const float* in, int64_t n, float* out, bool load_barrier = true) {
  const int t = threadIdx.x;
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + t;
  s[t] = i < n ? in[i] : 0.0f;
  if (load_barrier) __syncthreads();
  for (int stride = blockDim.x / 2; stride > 0; stride /= 2) {
    if (t < stride) s[t] += s[t + stride];
    __syncthreads();
  }
  if (t == 0) out[blockIdx.x] = s[0];
}

__global__ void tree_static(const float* in, int64_t n, float* out) {
  __shared__ float s[kMaxThreads];
  tree_sum(s, in, n, out);
}

__global__ void tree_dynamic(const float* in, int64_t n, float* out) {
  tree_sum(slimtune_emu::dynamic_smem<float>(), in, n, out);
}

// tree_dynamic without the barrier between the loads and the tree.
__global__ void tree_missing_barrier(const float* in, int64_t n, float* out) {
  tree_sum(slimtune_emu::dynamic_smem<float>(), in, n, out, false);
}

// Warp sums by shuffles, then the warps' sums through shared memory (blockDim.x a multiple of 32).
__global__ void warp_reduce(const float* in, int64_t n, float* out) {
  __shared__ float partial[kMaxThreads / 32];
  const int t = threadIdx.x, lane = t % warpSize, warp = t / warpSize;
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + t;
  float v = i < n ? in[i] : 0.0f;
  for (int offset = warpSize / 2; offset > 0; offset /= 2) v += __shfl_down_sync(0xFFFFFFFFu, v, offset);
  if (lane == 0) partial[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < static_cast<int>(blockDim.x) / warpSize ? partial[lane] : 0.0f;
    for (int mask = warpSize / 2; mask > 0; mask /= 2) v += __shfl_xor_sync(0xFFFFFFFFu, v, mask);
    if (lane == 0) out[blockIdx.x] = v;
  }
}

// Per thread: [ballot(x > 0), any(x > 0), all(x > 0), shfl(x, lane 3), shfl_up(x, 1), shfl_down(x, 2),
// shfl_xor(x, 5), shfl(x, 1, width 8)], for a full warp per 32 threads.
__global__ void warp_ops(const float* in, int64_t, float* out) {
  const int t = threadIdx.x + blockIdx.x * blockDim.x;
  const float x = in[t];
  const unsigned full = 0xFFFFFFFFu;
  float* o = out + 8 * static_cast<int64_t>(t);
  o[0] = static_cast<float>(__ballot_sync(full, x > 0) & 0xFFFFu);  // low bits: exact in a float
  o[1] = __any_sync(full, x > 0);
  o[2] = __all_sync(full, x > 0);
  o[3] = __shfl_sync(full, x, 3);
  o[4] = __shfl_up_sync(full, x, 1);
  o[5] = __shfl_down_sync(full, x, 2);
  o[6] = __shfl_xor_sync(full, x, 5);
  o[7] = __shfl_sync(full, x, 1, 8);
}

// out[0] = sum by float atomics, out[1] = sum of int(x) by 64-bit int atomics, out[2] = max of int(x)
// and out[3] = -min of int(x) as int bits (non-negative, so the zero start is neutral),
// out[4] = sum by double atomics, out[5] = count by a CAS loop.
__global__ void atomics(const float* in, int64_t n, float* out) {
  __shared__ int imax, imin;
  __shared__ unsigned long long count;
  __shared__ long long isum;
  __shared__ double dsum;
  if (threadIdx.x == 0) {
    imax = -1000000;
    imin = 1000000;
    count = 0;
    isum = 0;
    dsum = 0;
  }
  __syncthreads();
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(blockDim.x) * gridDim.x) {
    atomicAdd(out, in[i]);
    atomicAdd(&isum, static_cast<long long>(in[i]));
    atomicMax(&imax, static_cast<int>(in[i]));
    atomicMin(&imin, static_cast<int>(in[i]));
    atomicAdd(&dsum, static_cast<double>(in[i]));
    unsigned long long old = count, seen;
    do {
      seen = old;
      old = atomicCAS(&count, seen, seen + 1ull);
    } while (old != seen);
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    atomicAdd(out + 1, static_cast<float>(isum));
    atomicMax(reinterpret_cast<int*>(out + 2), imax);
    atomicMax(reinterpret_cast<int*>(out + 3), -imin);
    atomicAdd(out + 4, static_cast<float>(dsum));
    atomicAdd(out + 5, static_cast<float>(count));
  }
}

__global__ void divergent_barrier(const float*, int64_t, float*) {
  if (threadIdx.x % 2 == 0) __syncthreads();
}

__global__ void barrier_after_exit(const float*, int64_t, float*) {
  if (threadIdx.x == 0) return;
  __syncthreads();
}

__global__ void divergent_warp(const float* in, int64_t, float* out) {
  float v = in[threadIdx.x];
  if (threadIdx.x < 16) {
    v = __shfl_xor_sync(0xFFFFFFFFu, v, 1);
  } else {
    v = __shfl_xor_sync(0xFFFFFFFFu, v, 2);
  }
  out[threadIdx.x] = v;
}

__global__ void noop(const float*, int64_t, float*) {}

using Kernel = void (*)(const float*, int64_t, float*);

Kernel find(const std::string& name) {
  static const struct {
    const char* name;
    Kernel kernel;
  } table[] = {{"tree_static", tree_static}, {"tree_dynamic", tree_dynamic},
               {"tree_missing_barrier", tree_missing_barrier}, {"warp_reduce", warp_reduce},
               {"warp_ops", warp_ops}, {"atomics", atomics}, {"divergent_barrier", divergent_barrier},
               {"barrier_after_exit", barrier_after_exit}, {"divergent_warp", divergent_warp}, {"noop", noop}};
  for (const auto& e : table) {
    if (name == e.name) return e.kernel;
  }
  return nullptr;
}

}  // namespace

int run(const std::string& name, const float* in, int64_t n, float* out, const unsigned grid[3],
        const unsigned block[3], size_t smem, int64_t opt_in_smem) {
  Kernel k = find(name);
  if (k == nullptr) return -1;
  // Without an opt-in the kernel is back at the default limit, whatever an earlier call set.
  const int limit = opt_in_smem >= 0 ? static_cast<int>(opt_in_smem) : 48 * 1024;
  cudaError_t e = cudaFuncSetAttribute(k, cudaFuncAttributeMaxDynamicSharedMemorySize, limit);
  if (e == cudaSuccess) {
    e = slimtune_emu::launch(k, dim3(grid[0], grid[1], grid[2]), dim3(block[0], block[1], block[2]), smem, nullptr,
                             in, n, out);
  }
  cudaGetLastError();  // a failed cudaFuncSetAttribute leaves its error pending, as in the CUDA runtime
  return e;
}

const char* error_string(int status) { return cudaGetErrorString(static_cast<cudaError_t>(status)); }

bool set_schedule(const std::string& spec) { return parse_schedule(spec, &config()); }

int64_t launch_count() { return static_cast<int64_t>(detail::launches()); }

}  // namespace selftest
}  // namespace slimtune_emu
