#include "common/checks.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <atomic>
#include <cmath>

#include "common/acc.h"

namespace slimtune {
namespace {

// One parallel pass over CPU indices: range and strict order. Unsorted input falls back to a sort.
template <typename I>
void check_cpu(const char* op, const at::Tensor& indices, const char* name, int64_t numel) {
  const I* p = indices.data_ptr<I>();
  const int64_t n = indices.numel();
  std::atomic<int64_t> first_bad{n};
  std::atomic<bool> sorted{true};
  at::parallel_for(0, n, 32768, [&](int64_t begin, int64_t end) {
    bool local_sorted = true;
    for (int64_t k = begin; k < end; ++k) {
      const int64_t v = static_cast<int64_t>(p[k]);
      if (v < 0 || v >= numel) {
        int64_t cur = first_bad.load();
        while (k < cur && !first_bad.compare_exchange_weak(cur, k)) {
        }
        return;
      }
      if (k > 0 && static_cast<int64_t>(p[k - 1]) >= v) local_sorted = false;
    }
    if (!local_sorted) sorted.store(false, std::memory_order_relaxed);
  });
  const int64_t bad = first_bad.load();
  SLIMTUNE_CHECK_ARG(bad == n, op, name, "holds ", bad < n ? static_cast<int64_t>(p[bad]) : 0, " at position ", bad,
                     ", out of range for a tensor of ", numel, " elements");
  if (sorted.load()) return;
  at::Tensor s = std::get<0>(indices.sort());
  const I* q = s.data_ptr<I>();
  for (int64_t k = 1; k < n; ++k) {
    SLIMTUNE_CHECK_ARG(q[k - 1] != q[k], op, name, "holds the index ", static_cast<int64_t>(q[k]),
                       " more than once; indices must be unique");
  }
}

// The first tensor argument (`ref`) and the first on another device than it (`bad`), by value:
// list elements do not outlive the scan.
struct Mismatch {
  at::Tensor ref, bad;
  const char* ref_name = nullptr;
  const char* bad_name = nullptr;
};

void visit(const at::Tensor& t, const char* name, Mismatch* m) {
  if (!t.defined() || m->bad.defined()) return;
  if (!m->ref.defined()) {
    m->ref = t;
    m->ref_name = name;
  } else if (t.device() != m->ref.device()) {
    m->bad = t;
    m->bad_name = name;
  }
}

void one_device_boxed(const c10::OperatorHandle& op, c10::DispatchKeySet ks, torch::jit::Stack* stack) {
  const auto& schema = op.schema();
  const auto& args = schema.arguments();
  const c10::IValue* first = &*(stack->end() - static_cast<std::ptrdiff_t>(args.size()));
  Mismatch m;
  for (size_t i = 0; i < args.size(); ++i) {
    const c10::IValue& v = first[i];
    const char* name = args[i].name().c_str();
    if (v.isTensor()) {
      visit(v.toTensor(), name, &m);
    } else if (v.isTensorList()) {
      for (const at::Tensor& t : v.toTensorList().vec()) visit(t, name, &m);
    }
  }
  if (m.bad.defined()) {
    std::string op_name = schema.name();
    op_name = op_name.substr(op_name.find("::") + 2);
    // Name the meta tensor when meta is mixed with a real device: it is the one that would
    // silently take the call to the meta kernel.
    if (m.ref.is_meta() && !m.bad.is_meta()) {
      std::swap(m.ref, m.bad);
      std::swap(m.ref_name, m.bad_name);
    }
    SLIMTUNE_CHECK_ARG(false, op_name, m.bad_name, "is on ", m.bad.device(), " but '", m.ref_name, "' is on ",
                       m.ref.device(), "; every tensor argument must be on one device (meta tensors only with "
                       "meta tensors)");
  }
  op.redispatchBoxed(ks & c10::DispatchKeySet(c10::DispatchKeySet::FULL_AFTER, c10::DispatchKey::BackendSelect),
                     stack);
}

}  // namespace

void register_one_device_check(torch::Library& m, c10::ArrayRef<const char*> ops) {
  for (const char* name : ops) m.impl(name, torch::CppFunction::makeFromBoxedFunction<&one_device_boxed>());
}

DType to_kernel_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return DType::Float32;
    case at::kHalf: return DType::Float16;
    case at::kBFloat16: return DType::BFloat16;
    case at::kDouble: return DType::Float64;
    default: TORCH_CHECK(false, "slimtune: unsupported dtype ", t);
  }
}

at::ScalarType to_scalar_type(DType t) {
  switch (t) {
    case DType::Float32: return at::kFloat;
    case DType::Float16: return at::kHalf;
    case DType::BFloat16: return at::kBFloat16;
    case DType::Float64: return at::kDouble;
  }
  TORCH_CHECK(false, "slimtune: unknown kernel dtype ", static_cast<int>(t));
}

IndexType to_kernel_index(at::ScalarType t) {
  TORCH_CHECK(t == at::kInt || t == at::kLong, "slimtune: unsupported index dtype ", t);
  return t == at::kInt ? IndexType::Int32 : IndexType::Int64;
}

at::ScalarType acc_scalar_type(at::ScalarType storage) { return to_scalar_type(acc_dtype(to_kernel_dtype(storage))); }

void check_same_device(const char* op, const at::Tensor& ref, const char* ref_name, const at::Tensor& t,
                       const char* name) {
  SLIMTUNE_CHECK_ARG(t.device() == ref.device(), op, name, "is on ", t.device(), " but '", ref_name, "' is on ",
                     ref.device());
}

void check_seed_tensor(const char* op, const at::Tensor& x, const at::Tensor& seed, const char* x_name) {
  SLIMTUNE_CHECK_ARG(seed.scalar_type() == at::kLong && seed.numel() == 1, op, "seed",
                     "must be a one-element int64 tensor, got ", seed.scalar_type(), " of shape ", seed.sizes());
  check_same_device(op, x, x_name, seed, "seed");
}

void check_flat_indices(const char* op, const at::Tensor& indices, const char* name, int64_t numel) {
  SLIMTUNE_CHECK_ARG(indices.scalar_type() == at::kInt || indices.scalar_type() == at::kLong, op, name,
                     "must be int32 or int64, got ", indices.scalar_type());
  SLIMTUNE_CHECK_ARG(indices.dim() == 1, op, name, "must be 1-D, got shape ", indices.sizes());
  if (indices.numel() == 0) return;
  if (indices.is_cpu()) {
    at::Tensor c = indices.contiguous();
    if (c.scalar_type() == at::kInt) {
      check_cpu<int32_t>(op, c, name, numel);
    } else {
      check_cpu<int64_t>(op, c, name, numel);
    }
    return;
  }
  auto minmax = at::aminmax(indices);
  at::Tensor bounds = at::stack({std::get<0>(minmax).to(at::kLong), std::get<1>(minmax).to(at::kLong)}).cpu();
  const int64_t lo = bounds[0].item<int64_t>(), hi = bounds[1].item<int64_t>();
  SLIMTUNE_CHECK_ARG(lo >= 0 && hi < numel, op, name, "holds values in [", lo, ", ", hi,
                     "], out of range for a tensor of ", numel, " elements");
  at::Tensor s = std::get<0>(indices.sort());
  const bool unique = indices.numel() < 2 || s.slice(0, 1).ne(s.slice(0, 0, -1)).all().item<bool>();
  SLIMTUNE_CHECK_ARG(unique, op, name, "holds an index more than once; indices must be unique");
}

bool all_finite(const at::Tensor& t) {
  if (t.numel() == 0 || !at::isFloatingType(t.scalar_type())) return true;
  if (!t.is_cpu()) return at::isfinite(t).all().item<bool>();
  const at::Tensor c = t.contiguous();
  std::atomic<bool> ok{true};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, c.scalar_type(), "all_finite", [&] {
    const scalar_t* p = c.data_ptr<scalar_t>();
    at::parallel_for(0, c.numel(), 65536, [&](int64_t begin, int64_t end) {
      bool local = true;
      for (int64_t i = begin; i < end; ++i) local &= std::isfinite(static_cast<double>(p[i]));
      if (!local) ok.store(false, std::memory_order_relaxed);
    });
  });
  return ok.load();
}

int64_t token_count(const at::Tensor& t) { return c10::multiply_integers(t.sizes().slice(0, t.dim() - 1)); }

at::Tensor as_token_rows(const at::Tensor& t) { return t.reshape({token_count(t), t.size(-1)}); }

bool same_tokens(const at::Tensor& a, const at::Tensor& b) {
  return a.dim() == b.dim() && a.sizes().slice(0, a.dim() - 1) == b.sizes().slice(0, b.dim() - 1);
}

}  // namespace slimtune
