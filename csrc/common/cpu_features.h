// Which hand-vectorized CPU forms this machine runs, read once per process. SLIMTUNE_CPU_NO_AVX512
// and SLIMTUNE_CPU_NO_AVX2 (any value) switch them off, so a machine that has them can test the
// portable paths every other machine runs.
#pragma once
#include <cstdlib>

namespace slimtune {

// AVX-512 F and BW.
inline bool cpu_avx512() {
#if defined(__x86_64__) && defined(__GNUC__)
  static const bool ok = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                         std::getenv("SLIMTUNE_CPU_NO_AVX512") == nullptr;
  return ok;
#else
  return false;
#endif
}

inline bool cpu_avx2() {
#if defined(__x86_64__) && defined(__GNUC__)
  static const bool ok = __builtin_cpu_supports("avx2") && std::getenv("SLIMTUNE_CPU_NO_AVX2") == nullptr;
  return ok;
#else
  return false;
#endif
}

}  // namespace slimtune
