// Each family's op schemas, written once and defined in every library that serves them:
// `slimtune` (TORCH_LIBRARY_FRAGMENT in each family's glue) and, under host emulation,
// the emulator's `slimtune_emu`.
#pragma once
#include <torch/library.h>

namespace slimtune {

void define_sparse_delta_schemas(torch::Library& m);
void define_lora_schemas(torch::Library& m);
void define_memsave_schemas(torch::Library& m);

inline void define_all_schemas(torch::Library& m) {
  define_sparse_delta_schemas(m);
  define_lora_schemas(m);
  define_memsave_schemas(m);
}

}  // namespace slimtune
