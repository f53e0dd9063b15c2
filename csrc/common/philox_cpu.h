// Philox keep bits on the CPU, many blocks at a time (the LoRA and memsave dropout masks).
#pragma once

#include <cstdint>

namespace slimtune {
namespace philox {

// keep[k] = the 8 keep bits (keep_bits, threshold `thresh`) of the Philox4x32-10 block with
// counter (first + k, stream, 0) under key `seed`, for k < nblk.
void keep_bytes(uint64_t seed, uint32_t stream, uint64_t first, int64_t nblk, uint32_t thresh, uint8_t* keep);

}  // namespace philox
}  // namespace slimtune
