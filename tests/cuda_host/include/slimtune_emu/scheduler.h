// The block scheduler of the host SIMT emulator: every CUDA thread of a block is a fiber
// (ucontext) on the launching OS thread, and the scheduler decides which fiber runs next each time
// one reaches a scheduling point (a barrier, a warp operation, an atomic). Because those choices
// follow a selectable schedule, code that is only correct for one interleaving gives different
// results under different schedules, which the tests compare.
#pragma once
#include <sys/mman.h>
#include <ucontext.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include <vector_types.h>

#include "slimtune_emu/errors.h"

// The CUDA built-in variables, switched by the scheduler whenever a different fiber runs.
inline thread_local uint3 threadIdx;
inline thread_local uint3 blockIdx;
inline thread_local dim3 blockDim;
inline thread_local dim3 gridDim;
constexpr int warpSize = 32;

namespace slimtune_emu {

// inorder: threads (and blocks) in index order, switching at every scheduling point.
// reversed: the same in descending order. shuffled: a seeded random thread at every point and a
// seeded random block order. barrier: each thread runs until it must wait (a barrier, or a warp
// operation its lanes have not reached), then the next one in index order.
enum class Schedule { InOrder, Reversed, Shuffled, Barrier };

struct Config {
  Schedule schedule = Schedule::InOrder;
  uint64_t seed = 0;
};

inline bool parse_schedule(const std::string& text, Config* out) {
  const auto colon = text.find(':');
  const std::string name = text.substr(0, colon);
  Config c;
  if (colon != std::string::npos) c.seed = std::strtoull(text.c_str() + colon + 1, nullptr, 10);
  if (name == "inorder") c.schedule = Schedule::InOrder;
  else if (name == "reversed") c.schedule = Schedule::Reversed;
  else if (name == "shuffled") c.schedule = Schedule::Shuffled;
  else if (name == "barrier") c.schedule = Schedule::Barrier;
  else return false;
  *out = c;
  return true;
}

// Process-wide; starts from SLIMTUNE_EMU_SCHEDULE ("inorder", "reversed", "shuffled:SEED", "barrier").
inline Config& config() {
  static Config c = [] {
    Config from_env;
    const char* env = std::getenv("SLIMTUNE_EMU_SCHEDULE");
    if (env != nullptr && !parse_schedule(env, &from_env)) {
      std::fprintf(stderr, "SLIMTUNE_EMU_SCHEDULE=%s: expected inorder, reversed, shuffled:SEED or barrier\n", env);
      std::abort();
    }
    return from_env;
  }();
  return c;
}

namespace detail {

// Byte pattern of fresh shared memory: NaN as float/double/half, -1 as an integer, so a read of
// shared memory no thread of the block wrote poisons the result.
constexpr unsigned char kPoison = 0xFF;
constexpr size_t kStackBytes = size_t{64} << 10;
constexpr int kWarp = 32;

enum class State { Runnable, Barrier, Warp, Done };

struct Fiber {
  ucontext_t ctx;
  uint3 tid;
  State state;
  const char* site;  // where it waits, for error messages
};

// One pending warp-wide exchange. Two slot sets, by generation parity, so a lane that already left
// an exchange can deposit for the next one while slower lanes still read this one.
struct Warp {
  uint64_t gen = 0;
  uint32_t arrived = 0;
  uint32_t mask = 0;
  const char* site = nullptr;
  unsigned char slot[2][kWarp][16];
  bool pred[2][kWarp];
};

// Stacks are mapped once with a guard page below each, and reused by every launch.
class StackPool {
 public:
  void* get(size_t i) {
    while (stacks_.size() <= i) {
      const size_t guard = 4096;
      void* p = mmap(nullptr, kStackBytes + guard, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
      if (p == MAP_FAILED) std::abort();
      mprotect(p, guard, PROT_NONE);
      stacks_.push_back(static_cast<char*>(p) + guard);
    }
    return stacks_[i];
  }

 private:
  std::vector<void*> stacks_;
};

struct Block {
  std::function<void()> body;
  std::vector<Fiber> fibers;
  std::vector<Warp> warps;
  std::vector<unsigned char> dynamic_smem;
  ucontext_t scheduler;
  int current = -1;
  int at_barrier = 0;
  const char* barrier_site = nullptr;
  std::string error;
  std::mt19937_64 rng;
  Schedule schedule = Schedule::InOrder;
};

inline thread_local Block* active = nullptr;
inline thread_local StackPool stack_pool;

inline Block& block() { return *active; }
inline Fiber& self() { return active->fibers[active->current]; }
inline int self_linear() { return active->current; }

inline std::string where(const Fiber& f) {
  return "thread (" + std::to_string(f.tid.x) + "," + std::to_string(f.tid.y) + "," + std::to_string(f.tid.z) +
         ") of block (" + std::to_string(blockIdx.x) + "," + std::to_string(blockIdx.y) + "," +
         std::to_string(blockIdx.z) + ")";
}

// Back to the scheduler; returns when this fiber is chosen again.
inline void yield() { swapcontext(&self().ctx, &block().scheduler); }

// Ends the block with an error; the fiber is abandoned (never resumed).
[[noreturn]] inline void abort_block(std::string why) {
  Block& b = block();
  if (b.error.empty()) b.error = std::move(why);
  self().state = State::Done;
  yield();
  std::abort();  // unreachable: an aborted block is never resumed
}

inline void fiber_main() {
  block().body();
  self().state = State::Done;
  // Returning resumes uc_link, the scheduler.
}

inline int pick_next(Block& b) {
  const int n = static_cast<int>(b.fibers.size());
  auto runnable = [&](int i) { return b.fibers[i].state == State::Runnable; };
  switch (b.schedule) {
    case Schedule::Barrier:
      if (b.current >= 0 && runnable(b.current)) return b.current;
      [[fallthrough]];
    case Schedule::InOrder:
      for (int k = 1; k <= n; ++k) {
        const int i = (b.current + k) % n;
        if (runnable(i)) return i;
      }
      return -1;
    case Schedule::Reversed:
      for (int k = 1; k <= n; ++k) {
        const int i = ((b.current < 0 ? n : b.current) - k + 2 * n) % n;
        if (runnable(i)) return i;
      }
      return -1;
    case Schedule::Shuffled: {
      int count = 0;
      for (int i = 0; i < n; ++i) count += runnable(i);
      if (count == 0) return -1;
      int pick = static_cast<int>(b.rng() % static_cast<uint64_t>(count));
      for (int i = 0; i < n; ++i) {
        if (runnable(i) && pick-- == 0) return i;
      }
      return -1;
    }
  }
  return -1;
}

// No fiber can run but not all are done: name who waits where.
inline std::string describe_deadlock(const Block& b) {
  int done = 0, barrier = 0, warp = 0;
  std::string first_barrier, first_warp;
  for (const Fiber& f : b.fibers) {
    if (f.state == State::Done) ++done;
    if (f.state == State::Barrier && barrier++ == 0) first_barrier = where(f) + " at " + f.site;
    if (f.state == State::Warp && warp++ == 0) first_warp = where(f) + " at " + f.site;
  }
  std::string s = "deadlock: " + std::to_string(barrier) + " thread(s) wait at __syncthreads, " +
                  std::to_string(warp) + " at a warp operation, " + std::to_string(done) + " exited";
  if (barrier) s += "; e.g. " + first_barrier;
  if (warp) s += "; e.g. " + first_warp;
  return s + " (a barrier or warp operation not reached by every thread it names)";
}

// Runs one block to completion; returns "" or the reason it failed.
inline std::string run_block(Block& b, dim3 block_dim) {
  const int n = static_cast<int>(block_dim.x * block_dim.y * block_dim.z);
  b.fibers.resize(n);
  b.warps.assign((n + kWarp - 1) / kWarp, Warp{});
  b.at_barrier = 0;
  b.barrier_site = nullptr;
  b.error.clear();
  b.current = -1;
  for (int i = 0; i < n; ++i) {
    Fiber& f = b.fibers[i];
    f.tid = uint3{i % block_dim.x, (i / block_dim.x) % block_dim.y, i / (block_dim.x * block_dim.y)};
    f.state = State::Runnable;
    f.site = "";
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = stack_pool.get(i);
    f.ctx.uc_stack.ss_size = kStackBytes;
    f.ctx.uc_link = &b.scheduler;
    makecontext(&f.ctx, &fiber_main, 0);
  }
  for (;;) {
    const int next = pick_next(b);
    if (next < 0) {
      const bool all_done = std::all_of(b.fibers.begin(), b.fibers.end(), [](const Fiber& f) {
        return f.state == State::Done;
      });
      return all_done ? std::string() : describe_deadlock(b);
    }
    b.current = next;
    threadIdx = b.fibers[next].tid;
    swapcontext(&b.scheduler, &b.fibers[next].ctx);
    if (!b.error.empty()) return b.error;
  }
}

}  // namespace detail
}  // namespace slimtune_emu
