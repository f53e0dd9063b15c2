// cudaError_t and the error-reporting half of the CUDA runtime API, for the host emulator.
#pragma once
#include <string>

// The toolkit's own declarations (error codes, cudaStream_t, dim3); the emulator defines the
// functions below inline.
#include <cuda_runtime_api.h>

namespace slimtune_emu {
namespace detail {

// The last error of this OS thread and the sentence explaining it (CUDA has only fixed strings; the
// emulator says which limit or which threads were at fault).
struct ErrorState {
  cudaError_t code = cudaSuccess;
  cudaError_t detail_code = cudaSuccess;
  std::string detail;
};
inline thread_local ErrorState error_state;

inline const char* error_name(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorInvalidResourceHandle: return "invalid resource handle";
    case cudaErrorLaunchFailure: return "unspecified launch failure";
    default: return "unknown error";
  }
}

inline cudaError_t fail(cudaError_t code, std::string why) {
  error_state.code = code;
  error_state.detail_code = code;
  error_state.detail = std::string(error_name(code)) + ": " + why;
  return code;
}

}  // namespace detail

// The explanation of the most recent failure on this thread ("" when none).
inline const std::string& last_error_detail() { return detail::error_state.detail; }

}  // namespace slimtune_emu

extern "C" {

inline cudaError_t cudaGetLastError() {
  const cudaError_t e = slimtune_emu::detail::error_state.code;
  slimtune_emu::detail::error_state.code = cudaSuccess;
  return e;
}
inline cudaError_t cudaPeekAtLastError() { return slimtune_emu::detail::error_state.code; }
inline const char* cudaGetErrorString(cudaError_t e) {
  const auto& s = slimtune_emu::detail::error_state;
  return e == s.detail_code && !s.detail.empty() ? s.detail.c_str() : slimtune_emu::detail::error_name(e);
}
inline cudaError_t cudaDeviceSynchronize() { return cudaSuccess; }
inline cudaError_t cudaStreamSynchronize(cudaStream_t) { return cudaSuccess; }

}  // extern "C"
