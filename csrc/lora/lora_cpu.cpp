// CPU kernels of the LoRA family: the dropout passes (at::parallel_for over raw pointers).
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "common/acc.h"
#include "common/cpu_dispatch.h"
#include "common/philox.h"
#include "lora/lora.h"

// The Philox draws dominate the dropout passes: compile the batched generator for wide
// vector units too and let the loader pick (GCC ifunc clones; other compilers get one copy).
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define SLIMTUNE_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define SLIMTUNE_CLONES
#endif

namespace slimtune {
namespace lora {
namespace {

constexpr int kLanes = 16;

// keep[k] = the 8 keep bits of Philox block b0 + k, k < nblk. Blocks of kLanes counters run
// side by side (structure of arrays) so the 32x32->64 multiplies of philox::round vectorize.
SLIMTUNE_CLONES void keep_bytes(uint64_t seed, uint64_t offset, uint64_t b0, int64_t nblk, uint32_t thresh,
                                uint8_t* keep) {
  const uint32_t key0 = static_cast<uint32_t>(seed), key1 = static_cast<uint32_t>(seed >> 32);
  for (int64_t base = 0; base < nblk; base += kLanes) {
    uint32_t c0[kLanes], c1[kLanes], c2[kLanes], c3[kLanes];
    for (int l = 0; l < kLanes; ++l) {
      philox::mask_counter(offset, b0 + static_cast<uint64_t>(base + l), c0[l], c1[l], c2[l], c3[l]);
    }
    uint32_t k0 = key0, k1 = key1;
    for (int r = 0; r < 10; ++r) {
      for (int l = 0; l < kLanes; ++l) philox::round(c0[l], c1[l], c2[l], c3[l], k0, k1);
      k0 += philox::kW0;
      k1 += philox::kW1;
    }
    uint8_t bits[kLanes];
    for (int l = 0; l < kLanes; ++l) {
      bits[l] = static_cast<uint8_t>(philox::keep_bits(c0[l], c1[l], c2[l], c3[l], thresh));
    }
    const int n = static_cast<int>(std::min<int64_t>(kLanes, nblk - base));
    for (int l = 0; l < n; ++l) keep[base + l] = bits[l];
  }
}

// Expands keep bits to per-element multipliers (mult or 0) through a 256-entry table of
// 8 values, so a block costs one table copy. One per thread: it owns its scratch.
template <typename A>
class Multipliers {
 public:
  Multipliers(A mult, uint32_t thresh, uint64_t seed, uint64_t offset)
      : mult_(mult), thresh_(thresh), seed_(seed), offset_(offset) {
    if (thresh_ == 0) return;
    lut_.resize(256 * philox::kElemsPerBlock);
    for (int v = 0; v < 256; ++v) {
      for (int i = 0; i < philox::kElemsPerBlock; ++i) {
        lut_[v * philox::kElemsPerBlock + i] = ((v >> i) & 1) ? mult : A(0);
      }
    }
  }

  // out[j] = keep(e0 + j) ? mult : 0 for j < n.
  void row(int64_t e0, int64_t n, A* out) {
    if (thresh_ == 0) {
      std::fill(out, out + n, mult_);
      return;
    }
    constexpr int64_t E = philox::kElemsPerBlock;
    const int64_t b0 = e0 / E, b1 = (e0 + n + E - 1) / E;
    bytes_.resize(static_cast<size_t>(b1 - b0));
    keep_bytes(seed_, offset_, static_cast<uint64_t>(b0), b1 - b0, thresh_, bytes_.data());
    const int64_t skip = e0 - b0 * E;  // elements of the first block before e0
    int64_t j = 0;
    for (int64_t k = 0; k < b1 - b0; ++k) {
      const A* v = lut_.data() + bytes_[k] * E;
      const int64_t lo = k == 0 ? skip : 0;
      const int64_t cnt = std::min<int64_t>(E - lo, n - j);
      if (cnt == E) {
        std::copy(v, v + E, out + j);
      } else {
        std::copy(v + lo, v + lo + cnt, out + j);
      }
      j += cnt;
    }
  }

 private:
  A mult_;
  uint32_t thresh_;
  uint64_t seed_, offset_;
  std::vector<A> lut_;
  std::vector<uint8_t> bytes_;
};

inline int64_t row_grain(int64_t cols) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(cols, 1)); }

// Runs body(i, m) for every row i < rows, m holding row i's multipliers: each chunk of rows draws
// its Philox rows in order into one buffer.
template <typename A, typename Body>
void for_each_masked_row(int64_t rows, int64_t cols, const MaskParams& mp, Body&& body) {
  at::parallel_for(0, rows, row_grain(cols), [&](int64_t begin, int64_t end) {
    std::vector<A> m(static_cast<size_t>(cols));
    Multipliers<A> mk(static_cast<A>(mp.mult), mp.thresh, mp.seed, mp.offset);
    for (int64_t i = begin; i < end; ++i) {
      mk.row(mp.e_base + i * cols, cols, m.data());
      body(i, m.data());
    }
  });
}

// Calls f(X{}, T{}) with the storage type of x_dtype and the accumulation type of acc_dtype;
// empty tiles do nothing.
template <typename F>
Status dispatch_tile(int64_t rows, int64_t cols, DType x_dtype, DType acc_dtype, F&& f) {
  if (rows == 0 || cols == 0) return kSuccess;
  return dispatch_cpu_float(x_dtype, [&](auto x_tag) {
    return dispatch_acc(acc_dtype, [&](auto t_tag) {
      f(x_tag, t_tag);
      return kSuccess;
    });
  });
}

}  // namespace

Status dropout_scale_cpu(const DropoutScaleParams& p, void*) {
  const int64_t rows = p.rows, cols = p.cols, rs = p.x_rs, cs = p.x_cs;
  return dispatch_tile(rows, cols, p.x_dtype, p.out_dtype, [&](auto x_tag, auto o_tag) {
    using X = decltype(x_tag);
    using O = decltype(o_tag);
    using A = acc_t<O>;
    const X* xp = static_cast<const X*>(p.x);
    O* op = static_cast<O*>(p.out);
    for_each_masked_row<A>(rows, cols, p.mask, [&](int64_t i, const A* m) {
      const X* xr = xp + i * rs;
      O* orow = op + i * cols;
      if (cs == 1) {
        for (int64_t j = 0; j < cols; ++j) orow[j] = static_cast<O>(static_cast<A>(xr[j]) * m[j]);
      } else {
        for (int64_t j = 0; j < cols; ++j) orow[j] = static_cast<O>(static_cast<A>(xr[j * cs]) * m[j]);
      }
    });
  });
}

Status masked_add_cpu(const MaskedAddParams& p, void*) {
  const int64_t rows = p.rows, cols = p.cols;
  return dispatch_tile(rows, cols, p.dx_dtype, p.tmp_dtype, [&](auto d_tag, auto t_tag) {
    using D = decltype(d_tag);
    using T = decltype(t_tag);
    using A = acc_t<T>;
    D* dp = static_cast<D*>(p.dx);
    const T* tp = static_cast<const T*>(p.tmp);
    for_each_masked_row<A>(rows, cols, p.mask, [&](int64_t i, const A* m) {
      D* drow = dp + i * cols;
      const T* trow = tp + i * cols;
      for (int64_t j = 0; j < cols; ++j) drow[j] = static_cast<D>(static_cast<A>(drow[j]) + trow[j] * m[j]);
    });
  });
}

Status backward_tile_cpu(const BackwardTileParams& p, void*) {
  const int64_t rows = p.rows, cols = p.cols, rs = p.x_rs, cs = p.x_cs;
  return dispatch_tile(rows, cols, p.x_dtype, p.tmp_dtype, [&](auto x_tag, auto t_tag) {
    using X = decltype(x_tag);
    using T = decltype(t_tag);
    using A = acc_t<T>;
    const X* xp = static_cast<const X*>(p.x);
    X* dp = static_cast<X*>(p.dx);
    const T* tp = static_cast<const T*>(p.tmp);
    T* xdp = static_cast<T*>(p.xd);
    for_each_masked_row<A>(rows, cols, p.mask, [&](int64_t i, const A* m) {
      const X* xr = xp + i * rs;
      X* drow = dp + i * cols;
      const T* trow = tp + i * cols;
      T* xdrow = xdp + i * cols;
      for (int64_t j = 0; j < cols; ++j) {
        drow[j] = static_cast<X>(static_cast<A>(drow[j]) + trow[j] * m[j]);
        xdrow[j] = static_cast<T>(static_cast<A>(xr[j * cs]) * m[j]);
      }
    });
  });
}

Status dropout_mask_cpu(const DropoutMaskParams& p, void*) {
  const int64_t n = p.n;
  bool* out = p.out;
  constexpr int64_t chunk = 4096;
  at::parallel_for(0, (n + chunk - 1) / chunk, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> m(chunk);
    Multipliers<float> mk(1.0f, p.thresh, p.seed, p.offset);
    for (int64_t c = begin; c < end; ++c) {
      const int64_t e0 = c * chunk, len = std::min(chunk, n - e0);
      mk.row(e0, len, m.data());
      for (int64_t j = 0; j < len; ++j) out[e0 + j] = m[j] != 0.0f;
    }
  });
  return kSuccess;
}

}  // namespace lora
}  // namespace slimtune
