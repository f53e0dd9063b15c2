// TORCH_LIBRARY(slimtune_emu): the emulator's controls and self-test kernels. The project's ops are
// registered under the same library by the emulated glue (CPU dispatch key, CPU tensors).
#include <torch/library.h>

#include <ATen/ATen.h>

#include "selftest.h"

#include "common/schemas.h"

namespace {

void set_schedule(c10::string_view spec) {
  TORCH_CHECK(slimtune_emu::selftest::set_schedule(std::string(spec)), "slimtune_emu: argument 'spec' must be "
              "'inorder', 'reversed', 'shuffled:SEED' or 'barrier', got '", spec, "'");
}

// Runs self-test kernel `name` over float32 `x` into a fresh `out_size` float32 tensor. Returns the
// output and the launch's error message ("" on success).
std::tuple<at::Tensor, std::string> selftest(c10::string_view name, const at::Tensor& x, int64_t out_size,
                                             at::IntArrayRef grid, at::IntArrayRef block, int64_t smem,
                                             int64_t opt_in_smem) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat, "slimtune_emu: argument 'x' must be float32 on CPU");
  TORCH_CHECK(grid.size() == 3 && block.size() == 3, "slimtune_emu: 'grid' and 'block' take 3 dims");
  const at::Tensor xc = x.contiguous();
  at::Tensor out = at::zeros({out_size}, x.options());
  unsigned g[3], b[3];
  for (int d = 0; d < 3; ++d) {
    g[d] = static_cast<unsigned>(grid[d]);
    b[d] = static_cast<unsigned>(block[d]);
  }
  const int status = slimtune_emu::selftest::run(std::string(name), xc.data_ptr<float>(), xc.numel(),
                                                 out.data_ptr<float>(), g, b, static_cast<size_t>(smem), opt_in_smem);
  TORCH_CHECK(status != -1, "slimtune_emu: argument 'name': no self-test kernel '", name, "'");
  return {out, status == 0 ? std::string() : std::string(slimtune_emu::selftest::error_string(status))};
}

}  // namespace

TORCH_LIBRARY(slimtune_emu, m) {
  slimtune::define_all_schemas(m);
  m.def("_set_schedule(str spec) -> ()", &set_schedule);
  m.def("_selftest(str name, Tensor x, int out_size, int[] grid, int[] block, int smem, int opt_in_smem) "
        "-> (Tensor, str)", &selftest);
  m.def("_launch_count() -> int", [] { return slimtune_emu::selftest::launch_count(); });
}
