#include "cpu/sparse_delta_merge.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

namespace slimtune {
namespace cpu {
namespace {

template <typename W, typename V, typename I>
void merge_loop(W* weight, const I* indices, const V* values, int64_t n, double alpha) {
  using A = at::opmath_type<W>;
  const A a = static_cast<A>(alpha);
  // Indices are unique, so chunks never write the same element.
  at::parallel_for(0, n, 16384, [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) {
      W& w = weight[indices[k]];
      w = static_cast<W>(static_cast<A>(w) + a * static_cast<A>(values[k]));
    }
  });
}

}  // namespace

void sparse_delta_merge(at::Tensor& weight, const at::Tensor& indices, const at::Tensor& values, double alpha) {
  const int64_t n = indices.numel();
  if (n == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weight.scalar_type(), "sparse_delta_merge_cpu", [&] {
    using W = scalar_t;
    AT_DISPATCH_INDEX_TYPES(indices.scalar_type(), "sparse_delta_merge_cpu_index", [&] {
      if (values.scalar_type() == weight.scalar_type()) {
        merge_loop<W, W, index_t>(weight.data_ptr<W>(), indices.data_ptr<index_t>(), values.data_ptr<W>(), n, alpha);
      } else {
        merge_loop<W, float, index_t>(weight.data_ptr<W>(), indices.data_ptr<index_t>(), values.data_ptr<float>(), n,
                                      alpha);
      }
    });
  });
}

}  // namespace cpu
}  // namespace slimtune
