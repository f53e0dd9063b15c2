// Device-side intrinsics for the host SIMT emulator: block barrier, warp exchanges (a rendezvous of
// the lanes the mask names), atomics, and the arithmetic intrinsics the kernels use.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "slimtune_emu/scheduler.h"

namespace slimtune_emu {
namespace detail {

#define SLIMTUNE_EMU_STR2(x) #x
#define SLIMTUNE_EMU_STR(x) SLIMTUNE_EMU_STR2(x)
#define SLIMTUNE_EMU_SITE __FILE__ ":" SLIMTUNE_EMU_STR(__LINE__)

// Every thread of the block must reach the same barrier; threads that exited or wait elsewhere
// leave the others waiting, which the scheduler reports as a deadlock.
inline void sync_threads(const char* site) {
  Block& b = block();
  Fiber& f = self();
  if (b.at_barrier == 0) b.barrier_site = site;
  if (std::strcmp(b.barrier_site, site) != 0) {
    abort_block("divergent __syncthreads: " + where(f) + " waits at " + site + " while others wait at " +
                b.barrier_site);
  }
  f.state = State::Barrier;
  f.site = site;
  if (++b.at_barrier == static_cast<int>(b.fibers.size())) {
    for (Fiber& g : b.fibers) g.state = State::Runnable;
    b.at_barrier = 0;
  }
  yield();
}

// A scheduling point that does not wait: lets the schedule run another thread here.
inline void preempt() {
  if (block().schedule != Schedule::Barrier) yield();
}

inline uint32_t lanes_present(int warp) {
  const int left = static_cast<int>(block().fibers.size()) - warp * kWarp;
  return left >= kWarp ? 0xFFFFFFFFu : ((1u << left) - 1u);
}

// Deposits this lane's value and predicate, waits for every lane in `mask`, and returns the slot
// set the exchange used.
inline int warp_rendezvous(uint32_t mask, const void* value, size_t bytes, bool pred, const char* site) {
  Block& b = block();
  const int linear = self_linear(), wi = linear / kWarp, lane = linear % kWarp;
  Warp& w = b.warps[wi];
  if (!((mask >> lane) & 1u)) abort_block(where(self()) + " calls a warp operation at " + site + " with mask " +
                                          std::to_string(mask) + " that excludes its own lane");
  if (mask & ~lanes_present(wi)) abort_block("warp operation at " + std::string(site) + " names lanes beyond the block");
  if (w.arrived == 0) {
    w.mask = mask;
    w.site = site;
  } else if (w.mask != mask || std::strcmp(w.site, site) != 0) {
    abort_block("divergent warp operation: " + where(self()) + " at " + site + " while lanes of its warp wait at " +
                w.site);
  }
  const int set = static_cast<int>(w.gen & 1u);
  std::memcpy(w.slot[set][lane], value, bytes);
  w.pred[set][lane] = pred;
  w.arrived |= 1u << lane;
  if (w.arrived == mask) {
    ++w.gen;
    w.arrived = 0;
    for (int l = 0; l < kWarp; ++l) {
      if ((mask >> l) & 1u) b.fibers[wi * kWarp + l].state = State::Runnable;
    }
  } else {
    self().state = State::Warp;
    self().site = site;
  }
  yield();
  return set;
}

template <typename T>
T warp_shuffle(uint32_t mask, T v, int src_lane_in_warp, const char* site) {
  static_assert(sizeof(T) <= 16, "warp shuffle of a type wider than 16 bytes");
  const int set = warp_rendezvous(mask, &v, sizeof(T), false, site);
  if (src_lane_in_warp < 0 || !((mask >> src_lane_in_warp) & 1u)) return v;  // undefined in CUDA
  T out;
  std::memcpy(&out, block().warps[self_linear() / kWarp].slot[set][src_lane_in_warp], sizeof(T));
  return out;
}

inline int lane_id() { return self_linear() % kWarp; }

inline uint32_t warp_vote(uint32_t mask, bool pred, const char* site) {
  const int set = warp_rendezvous(mask, nullptr, 0, pred, site);
  const Warp& w = block().warps[self_linear() / kWarp];
  uint32_t bits = 0;
  for (int l = 0; l < kWarp; ++l) bits |= static_cast<uint32_t>(((mask >> l) & 1u) && w.pred[set][l]) << l;
  return bits;
}

template <typename T, typename F>
T atomic_update(T* address, F f) {
  preempt();
  const T old = *address;
  *address = f(old);
  return old;
}

}  // namespace detail

template <typename T>
T* dynamic_smem() {
  return reinterpret_cast<T*>(detail::block().dynamic_smem.data());
}

}  // namespace slimtune_emu

#define __syncthreads() ::slimtune_emu::detail::sync_threads(SLIMTUNE_EMU_SITE)
#define __shfl_sync(mask, v, src, ...) \
  ::slimtune_emu::detail::warp_shuffle_idx(mask, v, src, SLIMTUNE_EMU_SITE, ##__VA_ARGS__)
#define __shfl_up_sync(mask, v, delta, ...) \
  ::slimtune_emu::detail::warp_shuffle_up(mask, v, delta, SLIMTUNE_EMU_SITE, ##__VA_ARGS__)
#define __shfl_down_sync(mask, v, delta, ...) \
  ::slimtune_emu::detail::warp_shuffle_down(mask, v, delta, SLIMTUNE_EMU_SITE, ##__VA_ARGS__)
#define __shfl_xor_sync(mask, v, lane_mask, ...) \
  ::slimtune_emu::detail::warp_shuffle_xor(mask, v, lane_mask, SLIMTUNE_EMU_SITE, ##__VA_ARGS__)
#define __ballot_sync(mask, pred) ::slimtune_emu::detail::warp_vote(mask, (pred) != 0, SLIMTUNE_EMU_SITE)
#define __any_sync(mask, pred) (::slimtune_emu::detail::warp_vote(mask, (pred) != 0, SLIMTUNE_EMU_SITE) != 0u)
#define __all_sync(mask, pred) \
  (::slimtune_emu::detail::warp_vote(mask, (pred) != 0, SLIMTUNE_EMU_SITE) == static_cast<unsigned>(mask))

namespace slimtune_emu {
namespace detail {

// `width` splits the warp into segments of that many lanes; sources outside the caller's segment
// give the caller's own value, as on the GPU.
template <typename T>
T warp_shuffle_idx(uint32_t mask, T v, int src, const char* site, int width = kWarp) {
  const int lane = lane_id(), base = lane & ~(width - 1);
  return warp_shuffle(mask, v, base + (src & (width - 1)), site);
}
template <typename T>
T warp_shuffle_up(uint32_t mask, T v, unsigned delta, const char* site, int width = kWarp) {
  const int lane = lane_id(), base = lane & ~(width - 1), src = lane - static_cast<int>(delta);
  return warp_shuffle(mask, v, src >= base ? src : lane, site);
}
template <typename T>
T warp_shuffle_down(uint32_t mask, T v, unsigned delta, const char* site, int width = kWarp) {
  const int lane = lane_id(), base = lane & ~(width - 1), src = lane + static_cast<int>(delta);
  return warp_shuffle(mask, v, src < base + width ? src : lane, site);
}
template <typename T>
T warp_shuffle_xor(uint32_t mask, T v, int lane_mask, const char* site, int width = kWarp) {
  const int lane = lane_id(), base = lane & ~(width - 1), src = lane ^ lane_mask;
  return warp_shuffle(mask, v, src >= base && src < base + width ? src : lane, site);
}

}  // namespace detail
}  // namespace slimtune_emu

// Lanes of this warp that have not exited.
inline unsigned __activemask() {
  using namespace slimtune_emu::detail;
  const int wi = self_linear() / kWarp;
  unsigned bits = 0;
  for (int l = 0; l < kWarp; ++l) {
    const size_t i = static_cast<size_t>(wi * kWarp + l);
    if (i < block().fibers.size() && block().fibers[i].state != State::Done) bits |= 1u << l;
  }
  return bits;
}

inline void __syncwarp(unsigned mask = 0xFFFFFFFFu) { slimtune_emu::detail::warp_vote(mask, true, "__syncwarp"); }

[[noreturn]] inline void __trap() {
  slimtune_emu::detail::abort_block("__trap() in " + slimtune_emu::detail::where(slimtune_emu::detail::self()));
}
inline void __threadfence() { slimtune_emu::detail::preempt(); }
inline void __threadfence_block() { slimtune_emu::detail::preempt(); }

// Atomics: the fibers of a block share one OS thread, so the read-modify-write itself cannot be
// torn; the scheduling point before it lets the schedule reorder the updates of different threads.
#define SLIMTUNE_EMU_ATOMIC(name, expr)                                                                      \
  template <typename T, typename U,                                                                          \
            typename = std::enable_if_t<std::is_arithmetic<T>::value && std::is_convertible<U, T>::value>>    \
  inline T name(T* address, U val_in) {                                                                      \
    const T val = static_cast<T>(val_in);                                                                    \
    return slimtune_emu::detail::atomic_update(address, [&](T old) { return static_cast<T>(expr); });        \
  }
SLIMTUNE_EMU_ATOMIC(atomicAdd, old + val)
SLIMTUNE_EMU_ATOMIC(atomicSub, old - val)
SLIMTUNE_EMU_ATOMIC(atomicExch, val)
SLIMTUNE_EMU_ATOMIC(atomicMax, old < val ? val : old)
SLIMTUNE_EMU_ATOMIC(atomicMin, val < old ? val : old)
SLIMTUNE_EMU_ATOMIC(atomicAnd, old & val)
SLIMTUNE_EMU_ATOMIC(atomicOr, old | val)
SLIMTUNE_EMU_ATOMIC(atomicXor, old ^ val)
#undef SLIMTUNE_EMU_ATOMIC

template <typename T>
inline T atomicCAS(T* address, T compare, T val) {
  return slimtune_emu::detail::atomic_update(address, [&](T old) { return old == compare ? val : old; });
}

template <typename T>
inline T __ldg(const T* p) { return *p; }

// Correctly rounded single operations: the host build never contracts (-ffp-contract=off), so
// these equal the device's _rn intrinsics.
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fmaf_rn(float a, float b, float c) { return std::fma(a, b, c); }
inline double __dadd_rn(double a, double b) { return a + b; }
inline double __dmul_rn(double a, double b) { return a * b; }
inline double __fma_rn(double a, double b, double c) { return std::fma(a, b, c); }
inline float __frcp_rn(float a) { return 1.0f / a; }
inline float __fsqrt_rn(float a) { return std::sqrt(a); }
inline float rsqrtf(float a) { return 1.0f / std::sqrt(a); }
inline int __popc(unsigned v) { return __builtin_popcount(v); }
inline int __popcll(unsigned long long v) { return __builtin_popcountll(v); }
inline int __clz(int v) { return v == 0 ? 32 : __builtin_clz(static_cast<unsigned>(v)); }
inline int __ffs(int v) { return __builtin_ffs(v); }

// CUDA's global min/max overloads for integers and floats of one type.
template <typename T, typename = std::enable_if_t<std::is_arithmetic<T>::value>>
inline T max(T a, T b) { return a < b ? b : a; }
template <typename T, typename = std::enable_if_t<std::is_arithmetic<T>::value>>
inline T min(T a, T b) { return b < a ? b : a; }
