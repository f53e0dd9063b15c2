#include "cpu/lora_dropout.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>

#include "cuda/philox.h"

namespace slimtune {
namespace cpu {
namespace {

// Calls f(j, keep) for the n elements e0 .. e0 + n - 1 of one row, one Philox block per 8.
template <typename F>
inline void for_each_keep(int64_t e0, int64_t n, uint32_t thresh, uint64_t seed, uint64_t offset, F&& f) {
  if (thresh == 0) {
    for (int64_t j = 0; j < n; ++j) f(j, true);
    return;
  }
  int64_t j = 0;
  while (j < n) {
    const uint64_t e = static_cast<uint64_t>(e0 + j);
    const int lane = static_cast<int>(e % philox::kElemsPerBlock);
    const uint32_t bits =
        philox::keep_bits(philox::block(seed, offset, e / philox::kElemsPerBlock), thresh) >> lane;
    const int64_t cnt = std::min<int64_t>(philox::kElemsPerBlock - lane, n - j);
    for (int64_t c = 0; c < cnt; ++c) f(j + c, (bits >> c) & 1u);
    j += cnt;
  }
}

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
      const A m = static_cast<A>(mult);
      at::parallel_for(0, rows, row_grain(cols), [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) {
          const X* xr = xp + i * rs;
          O* orow = op + i * cols;
          for_each_keep(e_base + i * cols, cols, thresh, seed, offset, [&](int64_t j, bool k) {
            orow[j] = k ? static_cast<O>(static_cast<A>(xr[j * cs]) * m) : O(0);
          });
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
      const A m = static_cast<A>(mult);
      at::parallel_for(0, rows, row_grain(cols), [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) {
          D* drow = dp + i * cols;
          const T* trow = tp + i * cols;
          for_each_keep(e_base + i * cols, cols, thresh, seed, offset, [&](int64_t j, bool k) {
            const A add = k ? static_cast<A>(trow[j]) * m : A(0);
            drow[j] = static_cast<D>(accumulate ? static_cast<A>(drow[j]) + add : add);
          });
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
    for (int64_t c = begin; c < end; ++c) {
      const int64_t e0 = c * chunk;
      for_each_keep(e0, std::min(chunk, n - e0), thresh, seed, offset, [&](int64_t j, bool k) { p[e0 + j] = k; });
    }
  });
}

}  // namespace cpu
}  // namespace slimtune
