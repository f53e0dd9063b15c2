#include "cuda/common.cuh"
#include "cuda/sparse_delta_merge.h"

namespace slimtune {
namespace cuda {
namespace {

template <typename W, typename V, typename I>
__global__ void merge_kernel(W* __restrict__ weight, const I* __restrict__ indices,
                             const V* __restrict__ values, int64_t n, double alpha) {
  using A = typename Acc<W>::type;
  const A a = static_cast<A>(alpha);
  for (int64_t k = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; k < n;
       k += static_cast<int64_t>(blockDim.x) * gridDim.x) {
    const int64_t pos = static_cast<int64_t>(indices[k]);
    // One rounding to W: the sum is formed in the accumulation type.
    weight[pos] = from_acc<W>(to_acc(weight[pos]) + a * static_cast<A>(to_acc(values[k])));
  }
}

}  // namespace

Status sparse_delta_merge(void* weight, DType weight_dtype, const void* indices, IndexType index_type,
                          const void* values, DType value_dtype, int64_t n, double alpha, void* stream) {
  if (n == 0) return 0;
  constexpr int threads = 256;
  const unsigned int blocks = blocks_for(n, threads);
  auto s = static_cast<cudaStream_t>(stream);
  return dispatch_float(weight_dtype, [&](auto w_tag) {
    using W = decltype(w_tag);
    return dispatch_index(index_type, [&](auto i_tag) {
      using I = decltype(i_tag);
      if (value_dtype == weight_dtype) {
        merge_kernel<W, W, I><<<blocks, threads, 0, s>>>(static_cast<W*>(weight), static_cast<const I*>(indices),
                                                        static_cast<const W*>(values), n, alpha);
      } else if (value_dtype == DType::Float32) {
        merge_kernel<W, float, I><<<blocks, threads, 0, s>>>(static_cast<W*>(weight), static_cast<const I*>(indices),
                                                            static_cast<const float*>(values), n, alpha);
      } else {
        return static_cast<Status>(cudaErrorInvalidValue);
      }
      return last_status();
    });
  });
}

}  // namespace cuda
}  // namespace slimtune
