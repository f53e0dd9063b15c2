// Glue of the memsave family: argument checks, the one device-generic driver of each op, the
// schemas and the registration for every backend. Kernels: memsave_cpu.cpp, memsave.cu.
#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>
#include <ATen/native/Pool.h>
#include <torch/library.h>

#include <array>
#include <tuple>
#include <vector>

#include "common/backend.h"
#include "common/checks.h"
#include "common/philox.h"
#include "common/register.h"
#include "common/schemas.h"
#include "memsave/memsave.h"

namespace slimtune {
namespace memsave {
namespace {

// ---- argument checks (one place for every backend) ----

int64_t mask_bytes(int64_t numel) { return (numel + 7) / 8; }

void check_relu(const at::Tensor& x) {
  SLIMTUNE_CHECK_ARG(is_float_dtype(x.scalar_type()), "memsave_relu_mask", "x",
                     "must be float32, float16, bfloat16 or float64, got ", x.scalar_type());
}

void check_relu_backward(const at::Tensor& grad, const at::Tensor& mask) {
  constexpr const char* op = "memsave_relu_backward";
  SLIMTUNE_CHECK_ARG(is_float_dtype(grad.scalar_type()), op, "grad",
                     "must be float32, float16, bfloat16 or float64, got ", grad.scalar_type());
  SLIMTUNE_CHECK_ARG(mask.scalar_type() == at::kByte, op, "mask", "must be uint8 (bit-packed), got ",
                     mask.scalar_type());
  SLIMTUNE_CHECK_ARG(mask.dim() == 1 && mask.numel() == mask_bytes(grad.numel()), op, "mask",
                     "must be 1-D with ceil(grad.numel() / 8) = ", mask_bytes(grad.numel()), " bytes, got shape ",
                     mask.sizes());
  SLIMTUNE_CHECK_ARG(mask.is_contiguous(), op, "mask", "must be contiguous");
  check_same_device(op, grad, "grad", mask, "mask");
}

// The kernel geometry from the pool's arguments; `pooled` (the indices or the grad) is shaped
// like the pool's output.
PoolGeometry pool_geometry(const char* op, const at::Tensor& pooled, const char* pooled_name,
                           at::IntArrayRef input_size, at::IntArrayRef kernel_size, at::IntArrayRef stride,
                           at::IntArrayRef padding, at::IntArrayRef dilation) {
  const int64_t nd = static_cast<int64_t>(kernel_size.size());
  SLIMTUNE_CHECK_ARG(nd >= 1 && nd <= 3, op, "kernel_size", "must have 1 to 3 entries, got ", kernel_size);
  SLIMTUNE_CHECK_ARG(static_cast<int64_t>(stride.size()) == nd, op, "stride", "must have ", nd, " entries");
  SLIMTUNE_CHECK_ARG(static_cast<int64_t>(padding.size()) == nd, op, "padding", "must have ", nd, " entries");
  SLIMTUNE_CHECK_ARG(static_cast<int64_t>(dilation.size()) == nd, op, "dilation", "must have ", nd, " entries");
  const int64_t dims = static_cast<int64_t>(input_size.size());
  SLIMTUNE_CHECK_ARG(dims > nd, op, "input_size", "must have more than ", nd, " dims, got ", input_size);
  SLIMTUNE_CHECK_ARG(pooled.dim() == dims, op, pooled_name, "must have ", dims, " dims like the input, got shape ",
                     pooled.sizes());
  for (int64_t i = 0; i < dims; ++i) {
    SLIMTUNE_CHECK_ARG(input_size[i] >= 0 && (i < dims - nd || input_size[i] >= 1), op, "input_size",
                       "must be non-negative with positive spatial sizes, got ", input_size);
  }
  int64_t numel = 1;
  for (int64_t i = 0; i < dims; ++i) {
    SLIMTUNE_CHECK_ARG(!__builtin_mul_overflow(numel, input_size[i], &numel), op, "input_size",
                       "has more elements than int64 can count: ", input_size);
  }
  PoolGeometry g{};
  g.planes = 1;
  g.channels = 1;
  g.channels_last = false;
  for (int64_t i = 0; i < dims - nd; ++i) {
    SLIMTUNE_CHECK_ARG(pooled.size(i) == input_size[i], op, pooled_name, "has shape ", pooled.sizes(),
                       " but the input's leading dims are ", input_size.slice(0, dims - nd));
    g.planes *= input_size[i];
  }
  int64_t window = 1;
  for (int64_t d = 0; d < 3; ++d) {
    const int64_t j = d - (3 - nd);  // index into the per-dim lists, negative for unused dims
    const bool used = j >= 0;
    g.in[d] = used ? input_size[dims - nd + j] : 1;
    g.out[d] = used ? pooled.size(dims - nd + j) : 1;
    g.kernel[d] = used ? kernel_size[j] : 1;
    g.stride[d] = used ? stride[j] : 1;
    g.padding[d] = used ? padding[j] : 0;
    g.dilation[d] = used ? dilation[j] : 1;
    SLIMTUNE_CHECK_ARG(g.kernel[d] >= 1 && g.stride[d] >= 1 && g.dilation[d] >= 1 && g.padding[d] >= 0, op,
                       "kernel_size", "stride/dilation must be positive and padding non-negative");
    SLIMTUNE_CHECK_ARG(g.kernel[d] <= 127 && window * g.kernel[d] <= 127, op, "kernel_size", "window of ",
                       kernel_size, " does not fit int8 offsets (at most 127 elements)");
    window *= g.kernel[d];
    // The window (dilation included) must fit the padded input, padding at most half of it (as
    // torch's max_pool requires); then every window start lies in [-padding, in + padding).
    int64_t span = 0, padded = 0;
    SLIMTUNE_CHECK_ARG(!__builtin_mul_overflow(g.dilation[d], g.kernel[d] - 1, &span), op, "dilation",
                       "times kernel_size overflows int64: ", dilation, " and ", kernel_size);
    SLIMTUNE_CHECK_ARG(g.padding[d] <= (span >> 1) + (span & 1), op, "padding",
                       "must be at most half the window (kernel_size ", kernel_size, ", dilation ", dilation,
                       "), got ", padding);
    SLIMTUNE_CHECK_ARG(!__builtin_add_overflow(g.in[d], 2 * g.padding[d], &padded) && span < padded, op,
                       "kernel_size", kernel_size, " with dilation ", dilation, " spans more than the padded input ",
                       input_size);
    // The largest pooled size (ceil mode; the last window must start inside the input or its left padding).
    const int64_t room = padded - span - 1;
    int64_t most = room / g.stride[d] + 1 + (room % g.stride[d] != 0 ? 1 : 0), last_start = 0;
    if (__builtin_mul_overflow(most - 1, g.stride[d], &last_start) || last_start >= g.in[d] + g.padding[d]) --most;
    SLIMTUNE_CHECK_ARG(g.out[d] <= most, op, pooled_name, "has shape ", pooled.sizes(), " but a pool over input_size ",
                       input_size, " has at most ", most, " positions along spatial dim ", j);
  }
  const int64_t in_plane = g.in[0] * g.in[1] * g.in[2];
  g.fast = in_plane < (int64_t{1} << 31);
  if (g.fast) {
    g.div_in1 = FastDiv(static_cast<uint32_t>(g.in[1]));
    g.div_in2 = FastDiv(static_cast<uint32_t>(g.in[2]));
  }
  return g;
}

// Whether t, shaped (batch, channels, spatial...), is stored channels innermost (the layout
// of torch.channels_last and channels_last_3d, for any number of spatial dims) and not also
// plainly contiguous (one channel, or one spatial position, fits both: planes-major serves).
bool is_channels_last(const at::Tensor& t, int64_t nd) {
  if (t.dim() != nd + 2 || t.is_contiguous() || t.size(1) == 1) return false;
  int64_t expected = t.size(1);
  if (t.size(1) > 1 && t.stride(1) != 1) return false;
  for (int64_t d = t.dim() - 1; d >= 2; --d) {
    if (t.size(d) > 1 && t.stride(d) != expected) return false;
    expected *= t.size(d);
  }
  return t.size(0) <= 1 || t.stride(0) == expected;
}

// A fresh tensor shaped `sizes`, stored channels innermost when channels_last.
at::Tensor empty_pooled(at::IntArrayRef sizes, bool channels_last, const at::TensorOptions& opts) {
  if (!channels_last) return at::empty(sizes, opts);
  std::vector<int64_t> strides(sizes.size());
  int64_t s = sizes[1];
  strides[1] = 1;
  for (int64_t d = static_cast<int64_t>(sizes.size()) - 1; d >= 2; --d) {
    strides[d] = s;
    s *= sizes[d];
  }
  strides[0] = s;
  return at::empty_strided(sizes, strides, opts);
}

void set_channels_last(PoolGeometry& g, at::IntArrayRef input_size) {
  g.channels_last = true;
  g.channels = input_size[1];
}

// Storage position of logical (planes-major) output position i.
int64_t storage_index(const PoolGeometry& g, int64_t i) {
  if (!g.channels_last) return i;
  const int64_t per_plane = g.out[0] * g.out[1] * g.out[2];
  const int64_t pl = i / per_plane, o = i % per_plane;
  return (pl / g.channels * per_plane + o) * g.channels + pl % g.channels;
}

// Calls f(i, o) for every pooled position i (flat over planes) with its window start `o` (per dim).
template <typename F>
void for_each_window(const PoolGeometry& g, F&& f) {
  const int64_t per_plane = g.out[0] * g.out[1] * g.out[2];
  for (int64_t pl = 0; pl < g.planes; ++pl) {
    int64_t i = pl * per_plane;
    for (int64_t o0 = 0; o0 < g.out[0]; ++o0) {
      for (int64_t o1 = 0; o1 < g.out[1]; ++o1) {
        for (int64_t o2 = 0; o2 < g.out[2]; ++o2, ++i) {
          const int64_t start[3] = {o0 * g.stride[0] - g.padding[0], o1 * g.stride[1] - g.padding[1],
                                    o2 * g.stride[2] - g.padding[2]};
          if (!f(i, start)) return;
        }
      }
    }
  }
}

// The first output position whose window fails ok(i, start), or -1 when every window passes.
template <typename F>
int64_t first_bad_window(const PoolGeometry& g, F&& ok) {
  int64_t bad = -1;
  for_each_window(g, [&](int64_t i, const int64_t* start) {
    if (ok(i, start)) return true;
    bad = i;
    return false;
  });
  return bad;
}

// CPU only (no host sync), run when the kernel found a bad entry, to name the first one. Entry i
// of `entries` (T: int64 argmax indices, int8 window offsets) is a flat position in a grid of
// `extent` per dimension (the last fastest); it is good when it lies in that grid and each of its
// coordinates passes coord_ok(d, coordinate, start of output i's window in dimension d).
template <typename T, typename F>
void scan_entries_cpu(const char* op, const at::Tensor& entries, const char* name, const PoolGeometry& g,
                      const int64_t (&extent)[3], F&& coord_ok, const char* what) {
  const T* p = entries.const_data_ptr<T>();
  const int64_t size = extent[0] * extent[1] * extent[2];
  const int64_t bad = first_bad_window(g, [&](int64_t i, const int64_t* start) {
    int64_t v = p[storage_index(g, i)];
    bool ok = v >= 0 && v < size;
    for (int d = 2; ok && d >= 0; --d) {
      ok = coord_ok(d, v % extent[d], start[d]);
      v /= extent[d];
    }
    return ok;
  });
  SLIMTUNE_CHECK_ARG(bad < 0, op, name, "holds ", bad < 0 ? 0 : static_cast<int64_t>(p[storage_index(g, bad)]),
                     " at position ", bad, what);
}

// Each argmax index lies inside its own window.
void scan_compact_cpu(const char* op, const at::Tensor& idx, const PoolGeometry& g) {
  scan_entries_cpu<int64_t>(
      op, idx, "indices", g, g.in,
      [&](int d, int64_t coord, int64_t start) {
        const int64_t delta = coord - start;
        return delta >= 0 && delta % g.dilation[d] == 0 && delta / g.dilation[d] < g.kernel[d];
      },
      ", outside the pooling window of that output");
}

// Each offset lies in its window and points at an input element, not at padding.
void scan_backward_cpu(const char* op, const at::Tensor& offsets, const PoolGeometry& g) {
  scan_entries_cpu<int8_t>(
      op, offsets, "offsets", g, g.kernel,
      [&](int d, int64_t k, int64_t start) {
        const int64_t c = start + k * g.dilation[d];
        return c >= 0 && c < g.in[d];
      },
      ", outside its window or in the padding");
}

PoolGeometry check_maxpool_compact(const at::Tensor& indices, at::IntArrayRef input_size, at::IntArrayRef kernel_size,
                                   at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation) {
  constexpr const char* op = "memsave_maxpool_compact";
  SLIMTUNE_CHECK_ARG(indices.scalar_type() == at::kLong, op, "indices", "must be int64, got ", indices.scalar_type());
  return pool_geometry(op, indices, "indices", input_size, kernel_size, stride, padding, dilation);
}

PoolGeometry check_maxpool_backward(const at::Tensor& grad, const at::Tensor& offsets, at::IntArrayRef input_size,
                                    at::IntArrayRef kernel_size, at::IntArrayRef stride, at::IntArrayRef padding,
                                    at::IntArrayRef dilation) {
  constexpr const char* op = "memsave_maxpool_backward";
  SLIMTUNE_CHECK_ARG(is_float_dtype(grad.scalar_type()), op, "grad", "must be a float tensor, got ",
                     grad.scalar_type());
  SLIMTUNE_CHECK_ARG(offsets.scalar_type() == at::kChar, op, "offsets", "must be int8, got ", offsets.scalar_type());
  SLIMTUNE_CHECK_ARG(offsets.sizes() == grad.sizes(), op, "offsets", "has shape ", offsets.sizes(), " but 'grad' has ",
                     grad.sizes());
  check_same_device(op, grad, "grad", offsets, "offsets");
  return pool_geometry(op, grad, "grad", input_size, kernel_size, stride, padding, dilation);
}

void check_dropout(const at::Tensor& x, double p, const at::Tensor& seed) {
  constexpr const char* op = "memsave_dropout";
  SLIMTUNE_CHECK_ARG(is_float_dtype(x.scalar_type()), op, "x", "must be float32, float16, bfloat16 or float64, got ",
                     x.scalar_type());
  SLIMTUNE_CHECK_ARG(p >= 0.0 && p < 1.0, op, "p", "must be in [0, 1), got ", p);
  check_seed_tensor(op, x, seed);
}

// ---- the kernels of one backend ----

struct Kernels {
  const Backend& backend;
  KernelEntry<ReluParams> relu;
  KernelEntry<ReluBackwardParams> relu_backward;
  KernelEntry<MaxpoolCompactParams> maxpool_compact;
  KernelEntry<MaxpoolBackwardParams> maxpool_backward;
  KernelEntry<DropoutParams> dropout;
  KernelEntry<MaxpoolForwardParams> maxpool_forward;
};

// ---- the drivers (one per op, every backend) ----

// The mask of x, and relu(x) into `out` when it is defined.
at::Tensor run_relu(const Kernels& k, const at::Tensor& xc, at::Tensor* out, const char* op) {
  at::Tensor mask = at::empty({mask_bytes(xc.numel())}, xc.options().dtype(at::kByte));
  const ReluParams p{xc.data_ptr(), to_kernel_dtype(xc.scalar_type()), xc.numel(), out ? out->data_ptr() : nullptr,
                     static_cast<unsigned char*>(mask.data_ptr())};
  check_status(k.backend, k.relu(p, k.backend.stream(xc)), op);
  return mask;
}

// Elementwise kernels walk memory in order, so any dense layout (channels_last, a transpose)
// is used as it is; only a tensor with gaps or overlaps is copied (row-major).
at::Tensor dense(const at::Tensor& t) { return t.is_non_overlapping_and_dense() ? t : t.contiguous(); }

at::Tensor relu_mask_op(const Kernels& k, const at::Tensor& x) {
  check_relu(x);
  check_backend(k.backend, "memsave_relu_mask", x, "x");
  c10::DeviceGuard guard(x.device());
  return run_relu(k, dense(x), nullptr, "memsave_relu_mask");
}

std::tuple<at::Tensor, at::Tensor> relu_op(const Kernels& k, const at::Tensor& x) {
  check_relu(x);
  check_backend(k.backend, "memsave_relu", x, "x");
  c10::DeviceGuard guard(x.device());
  const at::Tensor xc = dense(x);
  at::Tensor out = at::empty_like(xc);  // a dense input's strides: the same memory order
  at::Tensor mask = run_relu(k, xc, &out, "memsave_relu");
  return {out, mask};
}

at::Tensor relu_backward_op(const Kernels& k, const at::Tensor& grad, const at::Tensor& mask) {
  check_relu_backward(grad, mask);
  check_backend(k.backend, "memsave_relu_backward", grad, "grad");
  c10::DeviceGuard guard(grad.device());
  const at::Tensor gc = dense(grad);
  at::Tensor out = at::empty_like(gc);
  const ReluBackwardParams p{gc.data_ptr(), to_kernel_dtype(gc.scalar_type()), gc.numel(),
                             static_cast<const unsigned char*>(mask.data_ptr()), out.data_ptr()};
  check_status(k.backend, k.relu_backward(p, k.backend.stream(gc)), "memsave_relu_backward");
  return out;
}

at::Tensor maxpool_compact_op(const Kernels& k, const at::Tensor& indices, at::IntArrayRef input_size,
                              at::IntArrayRef kernel_size, at::IntArrayRef stride, at::IntArrayRef padding,
                              at::IntArrayRef dilation) {
  PoolGeometry g = check_maxpool_compact(indices, input_size, kernel_size, stride, padding, dilation);
  check_backend(k.backend, "memsave_maxpool_compact", indices, "indices");
  c10::DeviceGuard guard(indices.device());
  const bool cl = is_channels_last(indices, static_cast<int64_t>(kernel_size.size()));
  if (cl) set_channels_last(g, input_size);
  const at::Tensor idx = cl ? indices : indices.contiguous();
  at::Tensor offsets = empty_pooled(idx.sizes(), cl, idx.options().dtype(at::kChar));
  const MaxpoolCompactParams p{idx.const_data_ptr<int64_t>(), static_cast<signed char*>(offsets.data_ptr()), g};
  const Status st = k.maxpool_compact(p, k.backend.stream(idx));
  // The CPU kernel checks every index against its window; the scan names the first bad one.
  if (st != kSuccess && idx.is_cpu()) scan_compact_cpu("memsave_maxpool_compact", idx, g);
  check_status(k.backend, st, "memsave_maxpool_compact");
  return offsets;
}

at::Tensor maxpool_backward_op(const Kernels& k, const at::Tensor& grad, const at::Tensor& offsets,
                               at::IntArrayRef input_size, at::IntArrayRef kernel_size, at::IntArrayRef stride,
                               at::IntArrayRef padding, at::IntArrayRef dilation) {
  PoolGeometry g = check_maxpool_backward(grad, offsets, input_size, kernel_size, stride, padding, dilation);
  check_backend(k.backend, "memsave_maxpool_backward", grad, "grad");
  c10::DeviceGuard guard(grad.device());
  // A channels-last grad keeps its layout (offsets follow it); anything else goes planes-major.
  const bool cl = is_channels_last(grad, static_cast<int64_t>(kernel_size.size()));
  if (cl) set_channels_last(g, input_size);
  const at::Tensor gc = cl ? grad : grad.contiguous();
  at::Tensor oc = offsets;
  if (!cl) {
    oc = offsets.contiguous();
  } else if (offsets.strides() != grad.strides()) {
    oc = empty_pooled(offsets.sizes(), true, offsets.options()).copy_(offsets);
  }
  // Every element is written by the kernel (zero where no window's argmax lands), in grad's
  // dtype: the sums are rounded once as they are stored, no accumulation-type copy.
  at::Tensor grad_in = empty_pooled(input_size, cl, grad.options());
  const MaxpoolBackwardParams p{gc.data_ptr(), to_kernel_dtype(gc.scalar_type()),
                                static_cast<const signed char*>(oc.data_ptr()), grad_in.data_ptr(), g};
  const Status st = k.maxpool_backward(p, k.backend.stream(gc));
  // The CPU kernel skips (and reports) offsets that leave their window; the scan names the first.
  if (st != kSuccess && oc.is_cpu()) scan_backward_cpu("memsave_maxpool_backward", oc, g);
  check_status(k.backend, st, "memsave_maxpool_backward");
  return grad_in;
}

at::Tensor dropout_op(const Kernels& k, const at::Tensor& x, double p, const at::Tensor& seed) {
  check_dropout(x, p, seed);
  check_backend(k.backend, "memsave_dropout", x, "x");
  c10::DeviceGuard guard(x.device());
  const at::Tensor xc = dense(x);
  at::Tensor out = at::empty_like(xc);
  const SeedArg s = seed_arg(k.backend, seed);
  const DropoutParams prm{xc.data_ptr(),        to_kernel_dtype(xc.scalar_type()), xc.numel(), out.data_ptr(), s.value,
                          philox::threshold(p), 1.0 - p,                           s.ptr};
  check_status(k.backend, k.dropout(prm, k.backend.stream(xc)), "memsave_dropout");
  return out;
}

// The arguments of memsave_maxpool_forward, checked alike on every device; returns the pooled
// sizes by ATen's own rule (ceil_mode included).
std::vector<int64_t> check_maxpool_forward(const at::Tensor& x, at::IntArrayRef kernel_size, at::IntArrayRef stride,
                                           at::IntArrayRef padding, at::IntArrayRef dilation, bool ceil_mode) {
  constexpr const char* op = "memsave_maxpool_forward";
  SLIMTUNE_CHECK_ARG(is_float_dtype(x.scalar_type()), op, "x", "must be float32, float16, bfloat16 or float64, got ",
                     x.scalar_type());
  const int64_t nd = static_cast<int64_t>(kernel_size.size());
  SLIMTUNE_CHECK_ARG(nd >= 1 && nd <= 3, op, "kernel_size", "must have 1 to 3 entries, got ", kernel_size);
  SLIMTUNE_CHECK_ARG(static_cast<int64_t>(stride.size()) == nd, op, "stride", "must have ", nd, " entries");
  SLIMTUNE_CHECK_ARG(static_cast<int64_t>(padding.size()) == nd, op, "padding", "must have ", nd, " entries");
  SLIMTUNE_CHECK_ARG(static_cast<int64_t>(dilation.size()) == nd, op, "dilation", "must have ", nd, " entries");
  SLIMTUNE_CHECK_ARG(x.dim() > nd, op, "x", "must have more than ", nd, " dims, got shape ", x.sizes());
  // The pooled sizes by ATen's own rule (ceil_mode included); pool_geometry checks the rest.
  std::vector<int64_t> out_size(x.sizes().begin(), x.sizes().end());
  for (int64_t j = 0; j < nd; ++j) {
    const int64_t in = x.size(x.dim() - nd + j);
    SLIMTUNE_CHECK_ARG(kernel_size[j] >= 1 && stride[j] >= 1 && dilation[j] >= 1 && padding[j] >= 0, op,
                       "kernel_size", "stride/dilation must be positive and padding non-negative");
    SLIMTUNE_CHECK_ARG(kernel_size[j] <= 127 && dilation[j] <= (int64_t{1} << 40), op, "kernel_size",
                       "window of ", kernel_size, " does not fit int8 offsets (at most 127 elements)");
    const int64_t span = dilation[j] * (kernel_size[j] - 1);
    SLIMTUNE_CHECK_ARG(padding[j] <= (span >> 1) + (span & 1), op, "padding", "must be at most half the window (kernel_size ",
                       kernel_size, ", dilation ", dilation, "), got ", padding);
    SLIMTUNE_CHECK_ARG(in >= 1 && padding[j] <= (int64_t{1} << 40) && in + 2 * padding[j] > dilation[j] * (kernel_size[j] - 1),
                       op, "kernel_size", kernel_size, " with dilation ", dilation, " spans more than the padded input ",
                       x.sizes());
    out_size[x.dim() - nd + j] =
        at::native::pooling_output_shape<int64_t>(in, kernel_size[j], padding[j], stride[j], dilation[j], ceil_mode);
  }
  return out_size;
}

// The max pool straight to (out, int8 offsets) in one kernel pass on every backend: no int64
// indices are written and read back. Channels-last x keeps its layout (out and offsets follow).
std::tuple<at::Tensor, at::Tensor> maxpool_forward_op(const Kernels& k, const at::Tensor& x,
                                                      at::IntArrayRef kernel_size, at::IntArrayRef stride,
                                                      at::IntArrayRef padding, at::IntArrayRef dilation,
                                                      bool ceil_mode) {
  constexpr const char* op = "memsave_maxpool_forward";
  const std::vector<int64_t> out_size = check_maxpool_forward(x, kernel_size, stride, padding, dilation, ceil_mode);
  check_backend(k.backend, op, x, "x");
  c10::DeviceGuard guard(x.device());
  const int64_t nd = static_cast<int64_t>(kernel_size.size());
  const bool cl = is_channels_last(x, nd);
  const at::Tensor xc = cl ? x : x.contiguous();
  at::Tensor out = empty_pooled(out_size, cl, xc.options());
  at::Tensor offsets = empty_pooled(out_size, cl, xc.options().dtype(at::kChar));
  PoolGeometry g = pool_geometry(op, out, "x", xc.sizes(), kernel_size, stride, padding, dilation);
  if (cl) set_channels_last(g, xc.sizes());
  const MaxpoolForwardParams p{xc.const_data_ptr(), to_kernel_dtype(xc.scalar_type()), out.data_ptr(),
                               static_cast<signed char*>(offsets.data_ptr()), g};
  check_status(k.backend, k.maxpool_forward(p, k.backend.stream(xc)), op);
  return {out, offsets};
}

// ---- registration ----

// The ops Bound registers in this order, each behind the one-device check (register.h);
// memsave_maxpool_forward, whose only tensor is x, is registered on its own.
constexpr std::array<const char*, 6> kOps{"memsave_relu", "memsave_relu_mask", "memsave_relu_backward",
                                          "memsave_maxpool_compact", "memsave_maxpool_backward", "memsave_dropout"};

// Binds the drivers to one backend's kernels: the dispatcher needs plain functions.
template <const Kernels& K>
struct Bound {
  static std::tuple<at::Tensor, at::Tensor> relu(const at::Tensor& x) { return relu_op(K, x); }
  static at::Tensor relu_mask(const at::Tensor& x) { return relu_mask_op(K, x); }
  static at::Tensor relu_backward(const at::Tensor& grad, const at::Tensor& mask) {
    return relu_backward_op(K, grad, mask);
  }
  static at::Tensor maxpool_compact(const at::Tensor& indices, at::IntArrayRef input_size,
                                    at::IntArrayRef kernel_size, at::IntArrayRef stride, at::IntArrayRef padding,
                                    at::IntArrayRef dilation) {
    return maxpool_compact_op(K, indices, input_size, kernel_size, stride, padding, dilation);
  }
  static at::Tensor maxpool_backward(const at::Tensor& grad, const at::Tensor& offsets, at::IntArrayRef input_size,
                                     at::IntArrayRef kernel_size, at::IntArrayRef stride, at::IntArrayRef padding,
                                     at::IntArrayRef dilation) {
    return maxpool_backward_op(K, grad, offsets, input_size, kernel_size, stride, padding, dilation);
  }
  static at::Tensor dropout(const at::Tensor& x, double p, const at::Tensor& seed) { return dropout_op(K, x, p, seed); }
  static std::tuple<at::Tensor, at::Tensor> maxpool_forward(const at::Tensor& x, at::IntArrayRef kernel_size,
                                                            at::IntArrayRef stride, at::IntArrayRef padding,
                                                            at::IntArrayRef dilation, bool ceil_mode) {
    return maxpool_forward_op(K, x, kernel_size, stride, padding, dilation, ceil_mode);
  }
  static void register_all(torch::Library& m) {
    impl_ops(m, kOps, &relu, &relu_mask, &relu_backward, &maxpool_compact, &maxpool_backward, &dropout);
    m.impl("memsave_maxpool_forward", &maxpool_forward);
  }
};

#ifndef SLIMTUNE_HOST_EMULATION
const Kernels kCpuKernels{kCpuBackend,           &relu_cpu,    &relu_backward_cpu, &maxpool_compact_cpu,
                          &maxpool_backward_cpu, &dropout_cpu, &maxpool_forward_cpu};
#endif
#ifdef SLIMTUNE_HAS_GPU
const Kernels kGpuKernels{kGpuBackend,            &relu_cuda,    &relu_backward_cuda, &maxpool_compact_cuda,
                          &maxpool_backward_cuda, &dropout_cuda, &maxpool_forward_cuda};
#endif

}  // namespace
}  // namespace memsave

void define_memsave_schemas(torch::Library& m) {
  // Bit-packed ReLU mask (1 bit per element) and the backward that reads it.
  m.def("memsave_relu(Tensor x) -> (Tensor out, Tensor mask)");
  m.def("memsave_relu_mask(Tensor x) -> Tensor");
  m.def("memsave_relu_backward(Tensor grad, Tensor mask) -> Tensor");
  // Max-pool argmax as an int8 offset inside its window, and the backward from it.
  m.def("memsave_maxpool_compact(Tensor indices, int[] input_size, int[] kernel_size, int[] stride, int[] padding, "
        "int[] dilation) -> Tensor");
  m.def("memsave_maxpool_backward(Tensor grad, Tensor offsets, int[] input_size, int[] kernel_size, int[] stride, "
        "int[] padding, int[] dilation) -> Tensor");
  // The max pool and its int8 offsets in one pass (no int64 indices).
  m.def("memsave_maxpool_forward(Tensor x, int[] kernel_size, int[] stride, int[] padding, int[] dilation, "
        "bool ceil_mode) -> (Tensor out, Tensor offsets)");
  // Dropout under a Philox mask drawn from `seed`, a one-element int64 tensor on x's device
  // (forward and backward alike).
  m.def("memsave_dropout(Tensor x, float p, Tensor seed) -> Tensor");
}

}  // namespace slimtune

SLIMTUNE_REGISTER_FAMILY(slimtune::define_memsave_schemas, slimtune::memsave)
