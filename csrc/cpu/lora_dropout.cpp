#include "cpu/lora_dropout.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "cuda/philox.h"

// The Philox draws dominate the dropout passes: compile the batched generator for wide
// vector units too and let the loader pick (GCC ifunc clones; other compilers get one copy).
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define SLIMTUNE_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define SLIMTUNE_CLONES
#endif

namespace slimtune {
namespace cpu {
namespace {

constexpr int kLanes = 16;

// keep[k] = the 8 keep bits of Philox block b0 + k, k < nblk. Blocks of kLanes counters run
// side by side (structure of arrays) so the 32x32->64 multiplies vectorize.
SLIMTUNE_CLONES void keep_bytes(uint64_t seed, uint64_t offset, uint64_t b0, int64_t nblk, uint32_t thresh,
                                uint8_t* keep) {
  const uint32_t key0 = static_cast<uint32_t>(seed), key1 = static_cast<uint32_t>(seed >> 32);
  for (int64_t base = 0; base < nblk; base += kLanes) {
    uint32_t c0[kLanes], c1[kLanes], c2[kLanes], c3[kLanes];
    for (int l = 0; l < kLanes; ++l) {
      const uint64_t c = offset + b0 + static_cast<uint64_t>(base + l);
      c0[l] = static_cast<uint32_t>(c);
      c1[l] = static_cast<uint32_t>(c >> 32);
      c2[l] = 0x4C6F5241u;
      c3[l] = 0u;
    }
    uint32_t k0 = key0, k1 = key1;
    for (int round = 0; round < 10; ++round) {
      for (int l = 0; l < kLanes; ++l) {
        const uint64_t p0 = static_cast<uint64_t>(0xD2511F53u) * c0[l];
        const uint64_t p1 = static_cast<uint64_t>(0xCD9E8D57u) * c2[l];
        const uint32_t n0 = static_cast<uint32_t>(p1 >> 32) ^ c1[l] ^ k0;
        const uint32_t n2 = static_cast<uint32_t>(p0 >> 32) ^ c3[l] ^ k1;
        c1[l] = static_cast<uint32_t>(p1);
        c3[l] = static_cast<uint32_t>(p0);
        c0[l] = n0;
        c2[l] = n2;
      }
      k0 += 0x9E3779B9u;
      k1 += 0xBB67AE85u;
    }
    // philox::keep_bits, written lane-parallel so the compares vectorize too.
    uint8_t bits[kLanes];
    for (int l = 0; l < kLanes; ++l) {
      const uint32_t w[4] = {c0[l], c1[l], c2[l], c3[l]};
      uint32_t b = 0;
      for (int i = 0; i < philox::kElemsPerBlock; ++i) {
        const uint32_t u = (i & 1) ? (w[i >> 1] >> 16) : (w[i >> 1] & 0xFFFFu);
        b |= static_cast<uint32_t>(u >= thresh) << i;
      }
      bits[l] = static_cast<uint8_t>(b);
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
      for (int i = 0; i < philox::kElemsPerBlock; ++i) lut_[v * philox::kElemsPerBlock + i] = ((v >> i) & 1) ? mult : A(0);
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

}  // namespace

void lora_dropout_scale(const at::Tensor& x, int64_t e_base, double mult, uint32_t thresh, uint64_t seed,
                        uint64_t offset, at::Tensor& out) {
  const int64_t rows = x.size(0), cols = x.size(1);
  if (rows == 0 || cols == 0) return;
  const int64_t rs = x.stride(0), cs = x.stride(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "lora_dropout_scale_x", [&] {
    using X = scalar_t;
    const X* xp = x.data_ptr<X>();
    AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "lora_dropout_scale_out", [&] {
      using O = scalar_t;
      using A = at::opmath_type<O>;
      O* op = out.data_ptr<O>();
      at::parallel_for(0, rows, row_grain(cols), [&](int64_t begin, int64_t end) {
        std::vector<A> m(static_cast<size_t>(cols));
        Multipliers<A> mk(static_cast<A>(mult), thresh, seed, offset);
        for (int64_t i = begin; i < end; ++i) {
          mk.row(e_base + i * cols, cols, m.data());
          const X* xr = xp + i * rs;
          O* orow = op + i * cols;
          if (cs == 1) {
            for (int64_t j = 0; j < cols; ++j) orow[j] = static_cast<O>(static_cast<A>(xr[j]) * m[j]);
          } else {
            for (int64_t j = 0; j < cols; ++j) orow[j] = static_cast<O>(static_cast<A>(xr[j * cs]) * m[j]);
          }
        }
      });
    });
  });
}

void lora_masked_add(at::Tensor& dx, const at::Tensor& tmp, int64_t e_base, double mult, uint32_t thresh,
                     uint64_t seed, uint64_t offset, bool accumulate) {
  const int64_t rows = dx.size(0), cols = dx.size(1);
  if (rows == 0 || cols == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dx.scalar_type(), "lora_masked_add_dx", [&] {
    using D = scalar_t;
    D* dp = dx.data_ptr<D>();
    AT_DISPATCH_FLOATING_TYPES(tmp.scalar_type(), "lora_masked_add_tmp", [&] {
      using T = scalar_t;
      using A = at::opmath_type<T>;
      const T* tp = tmp.data_ptr<T>();
      at::parallel_for(0, rows, row_grain(cols), [&](int64_t begin, int64_t end) {
        std::vector<A> m(static_cast<size_t>(cols));
        Multipliers<A> mk(static_cast<A>(mult), thresh, seed, offset);
        for (int64_t i = begin; i < end; ++i) {
          mk.row(e_base + i * cols, cols, m.data());
          D* drow = dp + i * cols;
          const T* trow = tp + i * cols;
          if (accumulate) {
            for (int64_t j = 0; j < cols; ++j) drow[j] = static_cast<D>(static_cast<A>(drow[j]) + trow[j] * m[j]);
          } else {
            for (int64_t j = 0; j < cols; ++j) drow[j] = static_cast<D>(trow[j] * m[j]);
          }
        }
      });
    });
  });
}

void lora_dropout_backward_tile(const at::Tensor& x, const at::Tensor& tmp, at::Tensor& dx, int64_t e_base,
                                double mult, uint32_t thresh, uint64_t seed, uint64_t offset, at::Tensor& xd) {
  const int64_t rows = x.size(0), cols = x.size(1);
  if (rows == 0 || cols == 0) return;
  const int64_t rs = x.stride(0), cs = x.stride(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "lora_dropout_backward_x", [&] {
    using X = scalar_t;
    const X* xp = x.data_ptr<X>();
    X* dp = dx.data_ptr<X>();
    AT_DISPATCH_FLOATING_TYPES(tmp.scalar_type(), "lora_dropout_backward_tmp", [&] {
      using T = scalar_t;
      using A = at::opmath_type<T>;
      const T* tp = tmp.data_ptr<T>();
      T* xdp = xd.data_ptr<T>();
      at::parallel_for(0, rows, row_grain(cols), [&](int64_t begin, int64_t end) {
        std::vector<A> m(static_cast<size_t>(cols));
        Multipliers<A> mk(static_cast<A>(mult), thresh, seed, offset);
        for (int64_t i = begin; i < end; ++i) {
          mk.row(e_base + i * cols, cols, m.data());
          const X* xr = xp + i * rs;
          X* drow = dp + i * cols;
          const T* trow = tp + i * cols;
          T* xdrow = xdp + i * cols;
          for (int64_t j = 0; j < cols; ++j) {
            drow[j] = static_cast<X>(static_cast<A>(drow[j]) + trow[j] * m[j]);
            xdrow[j] = static_cast<T>(static_cast<A>(xr[j * cs]) * m[j]);
          }
        }
      });
    });
  });
}

void lora_dropout_mask(at::Tensor& out, uint32_t thresh, uint64_t seed, uint64_t offset) {
  const int64_t n = out.numel();
  bool* p = out.data_ptr<bool>();
  constexpr int64_t chunk = 4096;
  at::parallel_for(0, (n + chunk - 1) / chunk, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> m(chunk);
    Multipliers<float> mk(1.0f, thresh, seed, offset);
    for (int64_t c = begin; c < end; ++c) {
      const int64_t e0 = c * chunk, len = std::min(chunk, n - e0);
      mk.row(e0, len, m.data());
      for (int64_t j = 0; j < len; ++j) p[e0 + j] = m[j] != 0.0f;
    }
  });
}

}  // namespace cpu
}  // namespace slimtune
