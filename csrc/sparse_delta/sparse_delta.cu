// CUDA kernels of the sparse-delta family (torch-free; launched through common/launch.cuh).
#include <type_traits>

#include "common/device.cuh"
#include "sparse_delta/sparse_delta.h"

namespace slimtune {
namespace sparse_delta {
namespace {

constexpr int kThreads = 256;

template <typename W, typename V, typename I>
__global__ void merge_kernel(W* __restrict__ weight, const I* __restrict__ indices, const V* __restrict__ values,
                             int64_t n, double alpha) {
  using A = acc_t<W>;
  const A a = static_cast<A>(alpha);
  for (int64_t k = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; k < n;
       k += static_cast<int64_t>(blockDim.x) * gridDim.x) {
    const int64_t pos = static_cast<int64_t>(indices[k]);
    // One rounding to W: the sum is formed in the accumulation type.
    weight[pos] = from_acc<W>(to_acc(weight[pos]) + a * static_cast<A>(to_acc(values[k])));
  }
}

// SpMM tiles. A CTA owns kRows rows of the delta and kTokens tokens (128 bytes of each row of x);
// it stages x[its tokens, kColumns columns] in shared memory one column tile at a time, and each
// thread keeps the sums of its (token, row) outputs in registers while the tiles pass. Lanes of a
// warp share a row (its entries are broadcast) and take consecutive tokens (a padded x tile keeps
// them in distinct banks). x is read rows/kRows times from L2, the CSR delta once per token tile,
// and the outputs go out through shared memory, coalesced.
template <typename X>
struct SpmmTile {
  static constexpr int kRows = 128;
  static constexpr int kColumns = 64;
  static constexpr int kTokens = 128 / static_cast<int>(sizeof(X));
  static constexpr int kThreads = 256;
  static constexpr int kRowStep = kThreads / kTokens;       // rows one sweep of the threads covers
  static constexpr int kPerThread = kRows / kRowStep;       // outputs per thread
  static constexpr int kPad = 4 / static_cast<int>(sizeof(X)) > 0 ? 4 / static_cast<int>(sizeof(X)) : 1;
};

// out[t, r] = base + bias[r] + Σ_{k in row r} values[k]·x[t, col_k] (bias may be null; base: out's own
// value where kAccumulate, else 0), rounded once. Per output the entries are added from 0 in row
// order (column tiles ascend), then the bias and the base once, as on the CPU.
template <typename X, typename V, typename I, bool kAccumulate>
__global__ void spmm_tile_kernel(const X* __restrict__ bias, const X* __restrict__ x, const I* __restrict__ indices,
                                 const int64_t* __restrict__ rowptr, const V* __restrict__ values, int64_t T,
                                 int64_t rows, int64_t cols, X* out) {
  using A = acc_t<X>;
  using Tile = SpmmTile<X>;
  constexpr int R = Tile::kRows, C = Tile::kColumns, TT = Tile::kTokens, P = Tile::kPerThread;
  constexpr int CP = C + Tile::kPad;
  __shared__ X x_s[TT][CP];
  __shared__ A out_s[R][TT + 1];
  __shared__ int64_t lo_s[R];  // a row's first entry in the current column tile
  __shared__ int32_t cnt_s[R];  // and how many it has there
  const int tid = threadIdx.x;
  const int64_t r0 = static_cast<int64_t>(blockIdx.x) * R;
  const int nr = static_cast<int>(rows - r0 < R ? rows - r0 : R);
  const bool any = rowptr[r0] != rowptr[r0 + nr];
  const int my_t = tid % TT, my_r = tid / TT;  // my outputs: token my_t of rows my_r + j·kRowStep
  const int64_t tiles = (T + TT - 1) / TT;
  for (int64_t tile = blockIdx.y; tile < tiles; tile += gridDim.y) {
    const int64_t t0 = tile * TT;
    const int tb = static_cast<int>(T - t0 < TT ? T - t0 : TT);
    A acc[P];  // unrolled loops keep it in registers
#pragma unroll
    for (int j = 0; j < P; ++j) acc[j] = A(0);
    // Row owners (threads [0, nr)) walk their row's entries through the column tiles.
    int64_t pos = tid < nr ? rowptr[r0 + tid] : 0;
    const int64_t last = tid < nr ? rowptr[r0 + tid + 1] : 0;
    for (int64_t c0 = 0; any && c0 < cols; c0 += C) {
      const int cb = static_cast<int>(cols - c0 < C ? cols - c0 : C);
      __syncthreads();  // x_s, lo_s and cnt_s are free
      for (int i = tid; i < tb * C; i += Tile::kThreads) {
        const int t = i / C, cc = i - t * C;
        if (cc < cb) x_s[t][cc] = x[(t0 + t) * cols + c0 + cc];
      }
      if (tid < R) {
        const int64_t lo = pos;
        if (tid < nr) {
          const int64_t end_flat = (r0 + tid) * cols + c0 + cb;
          while (pos < last && static_cast<int64_t>(indices[pos]) < end_flat) ++pos;
        }
        lo_s[tid] = lo;
        cnt_s[tid] = static_cast<int32_t>(pos - lo);
      }
      __syncthreads();
      if (my_t < tb) {
#pragma unroll
        for (int j = 0; j < P; ++j) {
          const int rr = my_r + j * Tile::kRowStep;
          const int64_t lo = lo_s[rr];
          const int n = cnt_s[rr];
          const int64_t base = (r0 + rr) * cols + c0;
          for (int e = 0; e < n; ++e) {
            const int cc = static_cast<int>(static_cast<int64_t>(indices[lo + e]) - base);
            acc[j] += static_cast<A>(to_acc(values[lo + e])) * to_acc(x_s[my_t][cc]);
          }
        }
      }
    }
    __syncthreads();  // out_s is free
#pragma unroll
    for (int j = 0; j < P; ++j) out_s[my_r + j * Tile::kRowStep][my_t] = acc[j];
    __syncthreads();
    for (int i = tid; i < tb * R; i += Tile::kThreads) {
      const int t = i / R, rr = i - t * R;
      if (rr < nr) {
        const int64_t o = (t0 + t) * rows + r0 + rr;
        const A term = bias == nullptr ? out_s[rr][t] : out_s[rr][t] + to_acc(bias[r0 + rr]);
        if constexpr (kAccumulate) {
          out[o] += term;
        } else {
          out[o] = from_acc<X>(term);
        }
      }
    }
  }
}

// SpMMᵀ tiles (dx's delta term) straight from the row-major CSR, without a transposed copy of the
// delta: a CTA owns kColumns output columns (columns of the weight) and kTokens tokens, and walks
// the delta's rows kRows at a time, staging g[its tokens, those rows] in shared memory. An output
// column's entries lie in many rows, so a thread cannot keep its sums in registers; it owns one
// token and a slice of kColumns/kSlices columns, and its sums live in a padded shared tile. Each
// (row, slice) has an owner that finds the slice's entries from the precomputed column-group starts
// of its row, so every entry is read once per token tile and no two threads add into one output:
// per (t, c) the entries are added in ascending row order, the order of the CPU kernel.
template <typename X>
struct SpmmTTile {
  static constexpr int kColumns = static_cast<int>(kSpmmTColumns);
  static constexpr int kTokens = 128 / static_cast<int>(sizeof(X));
  static constexpr int kThreads = 256;
  static constexpr int kSlices = kThreads / kTokens;  // column slices, one per thread of a token
  static constexpr int kSliceWidth = kColumns / kSlices;
  static constexpr int kRows = kThreads / kSlices;  // one owner per (row, slice)
  static constexpr int kPad = 4 / static_cast<int>(sizeof(X)) > 0 ? 4 / static_cast<int>(sizeof(X)) : 1;
};

// starts[r * (groups + 1) + G]: the offset from rowptr[r] of row r's first entry in column group G
// (columns from G·kColumns), G = groups giving the row's length. One binary search per slot.
template <typename I>
__global__ void spmm_t_starts_kernel(const I* __restrict__ indices, const int64_t* __restrict__ rowptr, int64_t rows,
                                     int64_t cols, int64_t group_cols, int64_t groups, int32_t* __restrict__ starts) {
  const int64_t n = rows * (groups + 1);
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(blockDim.x) * gridDim.x) {
    const int64_t r = i / (groups + 1), G = i - r * (groups + 1);
    const int64_t c = G * group_cols < cols ? G * group_cols : cols;
    const int64_t target = r * cols + c;
    int64_t lo = rowptr[r], hi = rowptr[r + 1];
    const int64_t first = lo;
    while (lo < hi) {
      const int64_t mid = lo + (hi - lo) / 2;
      if (static_cast<int64_t>(indices[mid]) < target) {
        lo = mid + 1;
      } else {
        hi = mid;
      }
    }
    starts[i] = static_cast<int32_t>(lo - first);
  }
}

// out[t, c] = base + Σ_{k with col_k = c} values[k]·g[t, row_k] over columns [c0, c0 + kColumns)
// (c0 = blockIdx.x·kColumns), base as in spmm_tile_kernel, rounded once.
template <typename X, typename V, typename I, bool kAccumulate>
__global__ void spmm_t_tile_kernel(const X* __restrict__ g, const I* __restrict__ indices,
                                   const int64_t* __restrict__ rowptr, const int32_t* __restrict__ starts,
                                   const V* __restrict__ values, int64_t T, int64_t rows, int64_t cols, X* out) {
  using A = acc_t<X>;
  using Tile = SpmmTTile<X>;
  constexpr int C = Tile::kColumns, TT = Tile::kTokens, S = Tile::kSlices, SW = Tile::kSliceWidth;
  constexpr int RT = Tile::kRows, RP = RT + Tile::kPad;
  __shared__ X g_s[TT][RP];
  __shared__ A acc_s[TT][C + 1];  // +1: lanes (consecutive tokens) at one column hit distinct banks
  __shared__ int64_t lo_s[RT][S];  // a (row, slice)'s first entry
  __shared__ int32_t cnt_s[RT][S];  // and how many it has
  const int tid = threadIdx.x;
  const int64_t G = blockIdx.x, groups = (cols + C - 1) / C;
  const int64_t c0 = G * C;
  const int cb = static_cast<int>(cols - c0 < C ? cols - c0 : C);
  const int my_t = tid % TT, my_s = tid / TT;      // my sums: token my_t, columns of slice my_s
  const int own_r = tid / S, own_s = tid - own_r * S;  // the (row, slice) whose entries I find
  const int64_t tiles = (T + TT - 1) / TT;
  for (int64_t tile = blockIdx.y; tile < tiles; tile += gridDim.y) {
    const int64_t t0 = tile * TT;
    const int tb = static_cast<int>(T - t0 < TT ? T - t0 : TT);
    __syncthreads();  // the previous tile's writers have read acc_s
    for (int i = tid; i < TT * (C + 1); i += Tile::kThreads) (&acc_s[0][0])[i] = A(0);
    for (int64_t r0 = 0; r0 < rows; r0 += RT) {
      const int rb = static_cast<int>(rows - r0 < RT ? rows - r0 : RT);
      __syncthreads();  // g_s, lo_s and cnt_s are free
      for (int i = tid; i < tb * RT; i += Tile::kThreads) {
        const int t = i / RT, rr = i - t * RT;
        if (rr < rb) g_s[t][rr] = g[(t0 + t) * rows + r0 + rr];
      }
      int64_t lo = 0;
      int32_t cnt = 0;
      if (own_r < rb) {
        const int64_t r = r0 + own_r;
        const int64_t first = rowptr[r];
        const int32_t* row_starts = starts + r * (groups + 1) + G;
        int64_t pos = first + row_starts[0];
        const int64_t end = first + row_starts[1];
        const int64_t from = r * cols + c0 + static_cast<int64_t>(own_s) * SW;
        while (pos < end && static_cast<int64_t>(indices[pos]) < from) ++pos;
        lo = pos;
        while (pos < end && static_cast<int64_t>(indices[pos]) < from + SW) ++pos;
        cnt = static_cast<int32_t>(pos - lo);
      }
      lo_s[own_r][own_s] = lo;
      cnt_s[own_r][own_s] = cnt;
      __syncthreads();
      if (my_t < tb) {
        for (int rr = 0; rr < rb; ++rr) {
          const int n = cnt_s[rr][my_s];
          if (n == 0) continue;
          const int64_t first = lo_s[rr][my_s];
          const int64_t base = (r0 + rr) * cols + c0;
          const A gv = to_acc(g_s[my_t][rr]);
          for (int e = 0; e < n; ++e) {
            const int cc = static_cast<int>(static_cast<int64_t>(indices[first + e]) - base);
            acc_s[my_t][cc] += static_cast<A>(to_acc(values[first + e])) * gv;
          }
        }
      }
    }
    __syncthreads();
    for (int i = tid; i < tb * C; i += Tile::kThreads) {
      const int t = i / C, cc = i - t * C;
      if (cc < cb) {
        const int64_t o = (t0 + t) * cols + c0 + cc;
        if constexpr (kAccumulate) {
          out[o] += acc_s[t][cc];
        } else {
          out[o] = from_acc<X>(acc_s[t][cc]);
        }
      }
    }
  }
}

// SDDMM tiles. A CTA owns kRows rows of W (all their entries) and one token slice; per tile of
// kTokens tokens it stages a[t, its rows] once and b[t, :] kColumns columns at a time in shared
// memory, and every entry whose column lies in the staged columns adds its kTokens products from
// shared memory. b is thus read rows/kRows times from L2 (once from DRAM while the row groups of a
// slice run together), a once, and no lane gathers from global memory. Tiles are 64 bytes of
// tokens deep (32 bf16/fp16, 16 float, 8 double), so the staged tiles take 8 KiB each.
template <typename X>
struct SddmmTile {
  static constexpr int kRows = 128;
  static constexpr int kColumns = 128;
  static constexpr int kTokens = 64 / static_cast<int>(sizeof(X));
  // Entries accumulated in shared memory per pass (16 KiB); a denser row group takes more passes.
  static constexpr int kEntries = 16384 / static_cast<int>(sizeof(acc_t<X>));
  static constexpr int kThreads = 256;
};

// The partial sums of the entries of rows [r0, r0 + kRows) over tokens [t_begin, t_end) (slice
// blockIdx.y), written to partial[blockIdx.y * K + k]. Each entry has one owner per column tile and
// its token products are summed in token order, so the result does not depend on thread order.
template <typename X, typename I>
__global__ void sddmm_tile_kernel(const X* __restrict__ a, const X* __restrict__ b, const I* __restrict__ indices,
                                  const int64_t* __restrict__ rowptr, int64_t K, int64_t T, int64_t rows,
                                  int64_t cols, int64_t slice, acc_t<X>* __restrict__ partial) {
  using A = acc_t<X>;
  using Tile = SddmmTile<X>;
  constexpr int R = Tile::kRows, C = Tile::kColumns, TT = Tile::kTokens, E = Tile::kEntries;
  __shared__ X a_s[TT][R];
  __shared__ X b_s[TT][C];
  __shared__ A acc_s[E];
  __shared__ int64_t lo_s[R];   // a row's first entry in the current column tile
  __shared__ int32_t off_s[R];  // its position among the tile's entries (exclusive prefix)
  __shared__ int32_t warp_s[R / 32];
  const int tid = threadIdx.x, nthreads = blockDim.x;
  const int64_t r0 = static_cast<int64_t>(blockIdx.x) * R;
  const int nr = static_cast<int>(rows - r0 < R ? rows - r0 : R);
  const int64_t t_begin = static_cast<int64_t>(blockIdx.y) * slice;
  const int64_t t_end = t_begin + slice < T ? t_begin + slice : T;
  const int64_t kb = rowptr[r0], ke = rowptr[r0 + nr];
  // The row this thread scans (threads [0, R) own one row each).
  const int64_t my_row = r0 + tid;
  const bool row_owner = tid < nr;
  const int64_t row_first = row_owner ? rowptr[my_row] : 0, row_last = row_owner ? rowptr[my_row + 1] : 0;
  for (int64_t pb = kb; pb < ke; pb += E) {
    const int64_t pe = ke - pb < E ? ke : pb + E;
    for (int e = tid; e < pe - pb; e += nthreads) acc_s[e] = A(0);
    // This pass's entries of my row: [first, last).
    const int64_t first = row_first > pb ? row_first : pb;
    const int64_t last = row_last < pe ? row_last : pe;
    for (int64_t t0 = t_begin; t0 < t_end; t0 += TT) {
      const int tb = static_cast<int>(t_end - t0 < TT ? t_end - t0 : TT);
      __syncthreads();  // the previous tile's readers of a_s are done
      for (int i = tid; i < tb * R; i += nthreads) {
        const int t = i / R, rr = i - t * R;
        if (rr < nr) a_s[t][rr] = a[(t0 + t) * rows + r0 + rr];
      }
      int64_t pos = first;
      for (int64_t c0 = 0; c0 < cols; c0 += C) {
        const int cb = static_cast<int>(cols - c0 < C ? cols - c0 : C);
        __syncthreads();  // b_s, lo_s and off_s are free
        for (int i = tid; i < tb * C; i += nthreads) {
          const int t = i / C, cc = i - t * C;
          if (cc < cb) b_s[t][cc] = b[(t0 + t) * cols + c0 + cc];
        }
        // My row's entries below column c0 + cb: columns ascend within a row, so the tiles
        // advance one pointer.
        int count = 0;
        if (tid < R) {
          const int64_t lo = pos;
          if (row_owner) {
            const int64_t end_flat = my_row * cols + c0 + cb;
            while (pos < last && static_cast<int64_t>(indices[pos]) < end_flat) ++pos;
          }
          count = static_cast<int>(pos - lo);
          lo_s[tid] = lo;
          // Inclusive scan of the counts over each warp, then over the warps.
          int incl = count;
          for (int d = 1; d < 32; d <<= 1) {
            const int up = __shfl_up_sync(0xffffffffu, incl, d);
            if ((tid & 31) >= d) incl += up;
          }
          off_s[tid] = incl - count;
          if ((tid & 31) == 31) warp_s[tid >> 5] = incl;
        }
        __syncthreads();
        int total = 0;
        for (int w = 0; w < R / 32; ++w) total += warp_s[w];
        if (tid < R) {
          for (int w = 0; w < (tid >> 5); ++w) off_s[tid] += warp_s[w];
        }
        __syncthreads();
        for (int e = tid; e < total; e += nthreads) {
          // The row holding tile entry e: the last row whose offset is <= e (rows with no entry
          // here share their successor's offset and come first).
          int lo = 0, hi = R;
          while (hi - lo > 1) {
            const int mid = (lo + hi) >> 1;
            if (off_s[mid] <= e) {
              lo = mid;
            } else {
              hi = mid;
            }
          }
          const int o = off_s[lo];
          const int64_t k = lo_s[lo] + (e - o);
          const int cc = static_cast<int>(static_cast<int64_t>(indices[k]) - (r0 + lo) * cols - c0);
          A s = 0;
          for (int t = 0; t < tb; ++t) s += to_acc(a_s[t][lo]) * to_acc(b_s[t][cc]);
          acc_s[k - pb] += s;
        }
      }
    }
    __syncthreads();
    for (int e = tid; e < pe - pb; e += nthreads) partial[static_cast<int64_t>(blockIdx.y) * K + pb + e] = acc_s[e];
    __syncthreads();  // acc_s is reset by the next pass
  }
}

template <typename A>
__global__ void sddmm_reduce_kernel(const A* __restrict__ partial, int64_t K, int64_t chunks, A* __restrict__ out) {
  for (int64_t k = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; k < K;
       k += static_cast<int64_t>(blockDim.x) * gridDim.x) {
    A s = 0;
    for (int64_t c = 0; c < chunks; ++c) s += partial[c * K + k];
    out[k] = s;
  }
}

// Thread per index k (positions [0, K)) and per rowptr entry r (positions K + r). The row of a
// valid index names the rowptr span it must lie in; with sorted indices and a non-decreasing
// rowptr from 0 to K, that makes rowptr exactly the row offsets.
template <typename I>
__global__ void validate_kernel(const I* __restrict__ indices, const int64_t* __restrict__ rowptr, int64_t K,
                                int64_t rows, int64_t cols, int64_t* __restrict__ first_bad) {
  const int64_t n = K + rows + 1;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(blockDim.x) * gridDim.x) {
    bool bad;
    if (i < K) {
      const int64_t v = static_cast<int64_t>(indices[i]);
      bad = v < 0 || v >= rows * cols || (i > 0 && static_cast<int64_t>(indices[i - 1]) >= v);
      if (!bad) {
        const int64_t r = v / cols;
        bad = !(rowptr[r] <= i && i < rowptr[r + 1]);
      }
    } else {
      const int64_t r = i - K;
      bad = (r == 0 && rowptr[0] != 0) || (r == rows && rowptr[rows] != K) || (r > 0 && rowptr[r - 1] > rowptr[r]);
    }
    // The minimum, whatever order threads run in.
    if (bad) atomicMin(reinterpret_cast<unsigned long long*>(first_bad), static_cast<unsigned long long>(i));
  }
}

// One CTA per group (x) and token tile (y, capped at 65535: CTAs loop over the rest).
bool tile_grid(int64_t groups, int64_t tiles, dim3* grid) {
  if (groups > 0x7fffffff) return false;
  *grid = dim3(static_cast<unsigned int>(groups), static_cast<unsigned int>(tiles < 65535 ? tiles : 65535));
  return true;
}

// run(kernel(std::bool_constant<accumulate>)). A base in out is only ever the accumulation type's:
// a rounded one would round twice.
template <typename X, typename Run, typename Kernel>
Status run_tiles(bool accumulate, Run&& run, Kernel&& kernel) {
  if (!accumulate) return run(kernel(std::false_type{}));
  if constexpr (std::is_same<acc_t<X>, X>::value) {
    return run(kernel(std::true_type{}));
  } else {
    return kInvalidValue;
  }
}

}  // namespace

Status validate_cuda(const ValidateParams& p, void* stream) {
  const dim3 grid(blocks_for(p.K + p.rows + 1, kThreads));
  auto s = static_cast<cudaStream_t>(stream);
  return dispatch_index(p.index_type, [&](auto i_tag) {
    using I = decltype(i_tag);
    return launch(validate_kernel<I>, grid, dim3(kThreads), 0, s, static_cast<const I*>(p.indices), p.rowptr, p.K,
                  p.rows, p.cols, p.first_bad);
  });
}

Status merge_cuda(const MergeParams& p, void* stream) {
  if (p.n == 0) return kSuccess;
  const dim3 grid(blocks_for(p.n, kThreads));
  auto s = static_cast<cudaStream_t>(stream);
  const DType w = p.weight_dtype;
  return dispatch_delta<CudaFloats>(w, p.index_type, p.value_dtype, [&](auto w_tag, auto i_tag, auto v_tag) {
    using W = decltype(w_tag);
    using I = decltype(i_tag);
    using V = decltype(v_tag);
    return launch(merge_kernel<W, V, I>, grid, dim3(kThreads), 0, s, static_cast<W*>(p.weight),
                  static_cast<const I*>(p.indices), static_cast<const V*>(p.values), p.n, p.alpha);
  });
}

Status spmm_cuda(const SpmmParams& p, void* stream) {
  if (p.T == 0 || p.rows == 0) return kSuccess;
  auto s = static_cast<cudaStream_t>(stream);
  return dispatch_delta<CudaFloats>(p.dtype, p.index_type, p.value_dtype, [&](auto x_tag, auto i_tag, auto v_tag) {
    using X = decltype(x_tag);
    using I = decltype(i_tag);
    using V = decltype(v_tag);
    using Tile = SpmmTile<X>;
    dim3 grid;
    if (!tile_grid((p.rows + Tile::kRows - 1) / Tile::kRows, (p.T + Tile::kTokens - 1) / Tile::kTokens, &grid)) {
      return kInvalidValue;
    }
    const auto run = [&](auto kernel) {
      return launch(kernel, grid, dim3(Tile::kThreads), 0, s, static_cast<const X*>(p.bias), static_cast<const X*>(p.x),
                    static_cast<const I*>(p.indices), p.rowptr, static_cast<const V*>(p.values), p.T, p.rows, p.cols,
                    static_cast<X*>(p.out));
    };
    return run_tiles<X>(p.accumulate, run, [](auto acc) { return spmm_tile_kernel<X, V, I, decltype(acc)::value>; });
  });
}

Status spmm_t_cuda(const SpmmTParams& p, void* stream) {
  if (p.T == 0 || p.cols == 0) return kSuccess;
  // Offsets within a row (at most cols entries) are kept as int32.
  if (p.cols > 0x7fffffff || (p.rows > 0 && p.starts == nullptr)) return kInvalidValue;
  auto s = static_cast<cudaStream_t>(stream);
  return dispatch_delta<CudaFloats>(p.dtype, p.index_type, p.value_dtype, [&](auto x_tag, auto i_tag, auto v_tag) {
    using X = decltype(x_tag);
    using I = decltype(i_tag);
    using V = decltype(v_tag);
    using Tile = SpmmTTile<X>;
    const int64_t groups = (p.cols + Tile::kColumns - 1) / Tile::kColumns;
    dim3 grid;
    if (!tile_grid(groups, (p.T + Tile::kTokens - 1) / Tile::kTokens, &grid)) return kInvalidValue;
    const auto* idx = static_cast<const I*>(p.indices);
    if (p.rows > 0) {
      const Status st = launch(spmm_t_starts_kernel<I>, dim3(blocks_for(p.rows * (groups + 1), kThreads)),
                               dim3(kThreads), 0, s, idx, p.rowptr, p.rows, p.cols, int64_t{Tile::kColumns}, groups,
                               p.starts);
      if (st != kSuccess) return st;
    }
    const auto run = [&](auto kernel) {
      return launch(kernel, grid, dim3(Tile::kThreads), 0, s, static_cast<const X*>(p.g), idx, p.rowptr,
                    static_cast<const int32_t*>(p.starts), static_cast<const V*>(p.values), p.T, p.rows, p.cols,
                    static_cast<X*>(p.out));
    };
    return run_tiles<X>(p.accumulate, run, [](auto acc) { return spmm_t_tile_kernel<X, V, I, decltype(acc)::value>; });
  });
}

Status sddmm_cuda(const SddmmParams& p, void* stream) {
  if (p.K == 0) return kSuccess;
  if (p.chunks < 1 || p.chunks > 65535) return kInvalidValue;
  auto s = static_cast<cudaStream_t>(stream);
  return dispatch_float(p.dtype, [&](auto x_tag) {
    using X = decltype(x_tag);
    using A = acc_t<X>;
    using Tile = SddmmTile<X>;
    // Slices of whole token tiles; trailing slices may be empty (their partials are zeros).
    const int64_t tiles = (p.T + Tile::kTokens - 1) / Tile::kTokens;
    const int64_t slice = (tiles + p.chunks - 1) / p.chunks * Tile::kTokens;
    const int64_t groups = (p.rows + Tile::kRows - 1) / Tile::kRows;
    if (groups > 0x7fffffff) return kInvalidValue;
    const dim3 grid(static_cast<unsigned int>(groups), static_cast<unsigned int>(p.chunks));
    const Status st = dispatch_index(p.index_type, [&](auto i_tag) {
      using I = decltype(i_tag);
      return launch(sddmm_tile_kernel<X, I>, grid, dim3(Tile::kThreads), 0, s, static_cast<const X*>(p.a),
                    static_cast<const X*>(p.b), static_cast<const I*>(p.indices), p.rowptr, p.K, p.T, p.rows,
                    p.cols, slice, static_cast<A*>(p.workspace));
    });
    if (st != kSuccess) return st;
    return launch(sddmm_reduce_kernel<A>, dim3(blocks_for(p.K, kThreads)), dim3(kThreads), 0, s,
                  static_cast<const A*>(p.workspace), p.K, p.chunks, static_cast<A*>(p.out));
  });
}

}  // namespace sparse_delta
}  // namespace slimtune
