// The Python module carries only build facts; every op is reached through torch.ops.slimtune.
#include <ATen/Parallel.h>
#include <pybind11/pybind11.h>

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
  m.doc() = "slimtune native extension: registers torch.ops.slimtune.* and reports build facts";
  m.def("has_cuda", [] {
#ifdef SLIMTUNE_WITH_CUDA
    return true;
#else
    return false;
#endif
  });
  m.def("build_facts", [] {
    py::dict d;
    d["torch_version"] = SLIMTUNE_TORCH_VERSION;
    d["compiler"] = SLIMTUNE_CXX_COMPILER;
#ifdef SLIMTUNE_WITH_CUDA
    d["cuda"] = true;
    d["nvcc_version"] = SLIMTUNE_NVCC_VERSION;
    d["cuda_archs"] = SLIMTUNE_CUDA_ARCHS;
#else
    d["cuda"] = false;
    d["nvcc_version"] = py::none();
    d["cuda_archs"] = "";
#endif
#if AT_PARALLEL_OPENMP
    d["parallel_backend"] = "OpenMP";
#elif AT_PARALLEL_NATIVE
    d["parallel_backend"] = "native";
#else
    d["parallel_backend"] = "unknown";
#endif
    return d;
  });
}
