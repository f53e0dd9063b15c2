// Torch-free entry points of the emulator's self-test kernels (selftest.cu), for registration.cpp.
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>

namespace slimtune_emu {
namespace selftest {

// Launches the named kernel(in, n, out); returns 0, a cudaError_t, or -1 for an unknown name.
// opt_in_smem >= 0 first sets the kernel's dynamic shared memory limit (cudaFuncSetAttribute), -1 the default.
int run(const std::string& name, const float* in, int64_t n, float* out, const unsigned grid[3],
        const unsigned block[3], size_t smem, int64_t opt_in_smem);
const char* error_string(int status);
// "inorder", "reversed", "shuffled:SEED" or "barrier"; false if not one of these.
bool set_schedule(const std::string& spec);
// Kernel launches so far (failed ones included, rejected configurations not).
int64_t launch_count();

}  // namespace selftest
}  // namespace slimtune_emu
