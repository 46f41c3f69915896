// A host emulator for the CUDA kernels of csrc/cuda/, so that CI (no GPU) runs them against the
// references. The .cu sources are compiled by g++ unchanged except for the launch syntax
// (`k<<<grid, block, smem, stream>>>(args)` is rewritten to `::emu::launch(cfg, k, args)` by
// tests/cuda_emu/build.py) against the shim headers in include/, which all come here.
//
// Model: the blocks of a grid run one after another; the threads of a block are cooperative
// fibers (ucontext) that switch only at __syncthreads() and at warp collectives (__shfl_*_sync,
// __ballot_sync). `__shared__` becomes a function-local `static` (one copy, shared by
// the fibers of the running block), poisoned when a block first reaches it. Barriers are strict: a block barrier is released when every
// thread of the block waits at it (a thread that exited while others wait at one is a divergent
// barrier, reported); a warp collective when every lane of its mask waits at
// a collective of the same kind and mask. A lane of the mask that has exited, or a block in which
// nothing can proceed (e.g. one warp at a warp collective while another waits at the block
// barrier), is reported as a launch error (cudaErrorLaunchFailure) with a message, as are launch
// configurations a GPU refuses (more than 1024 threads a block, grid.y or grid.z over 65535,
// grid.x over 2^31 - 1).
//
// Races: fibers do not interleave between sync points, but the order in which they are resumed
// can be set (forward, reverse, shuffled anew at every barrier; schedule()), and a race-free
// kernel gives the same bits under every order; tests compare them. That finds a read that
// misses its barrier, not every race. Shared memory is poisoned before each block. Not seen:
// the memory model, timing.
// Float maths is the host's (fmaf is a fused multiply-add; expf/logf differ from the GPU's by an
// ulp or two), so tests compare with the stated tolerances, not bit for bit.
#pragma once
#include <ucontext.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__
#define __launch_bounds__(...)
#define __restrict__ __restrict
// build.py rewrites each `__shared__ T name[...];` to `static T name[...];` followed by
// `::emu::shared_mark(&name, sizeof(name));`, which fills the variable with 0xff bytes (NaN as
// fp32, -1 as integers) the first time a block reaches it, as a GPU leaves shared memory
// undefined. The macro is for declarations the rewrite does not see.
#define __shared__ static

// ------------------------------------------------------------------------------ runtime types
struct uint3 {
  unsigned x, y, z;
};
struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct alignas(16) uint4 {
  unsigned x, y, z, w;
};
struct alignas(8) uint2 {
  unsigned x, y;
};
using cudaStream_t = void*;
enum cudaError_t : int {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorLaunchFailure = 719,
};

namespace emu {
struct State {
  uint3 thread{0, 0, 0}, block{0, 0, 0};
  dim3 block_dim, grid_dim;
  cudaError_t last_error = cudaSuccess;
  std::string message;  // why the last launch failed
};
inline State& state() {
  static State s;
  return s;
}
}  // namespace emu

// Read through accessors that the scheduler updates on every switch.
#define threadIdx (::emu::state().thread)
#define blockIdx (::emu::state().block)
#define blockDim (::emu::state().block_dim)
#define gridDim (::emu::state().grid_dim)

inline cudaError_t cudaGetLastError() {
  const cudaError_t e = emu::state().last_error;
  emu::state().last_error = cudaSuccess;
  return e;
}
inline cudaError_t cudaPeekAtLastError() { return emu::state().last_error; }
inline const char* cudaGetErrorString(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    default: return "unspecified launch failure";
  }
}

// --------------------------------------------------------------------------- float intrinsics
inline float __uint_as_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline uint32_t __float_as_uint(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
inline float __int_as_float(int32_t i) { return __uint_as_float(static_cast<uint32_t>(i)); }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fmul_rn(float a, float b) { return a * b; }
// expf, logf, fmaf, fmaxf, fminf: the C library's (<cmath> declares them globally).

// fp16 / bf16 as raw bits, rounded to nearest even like the GPU and torch's .to().
struct __half {
  uint16_t bits;
};
struct __nv_bfloat16 {
  uint16_t bits;
};
inline __half __ushort_as_half(uint16_t u) { return __half{u}; }
inline uint16_t __half_as_ushort(__half h) { return h.bits; }
inline __nv_bfloat16 __ushort_as_bfloat16(uint16_t u) { return __nv_bfloat16{u}; }
inline uint16_t __bfloat16_as_ushort(__nv_bfloat16 h) { return h.bits; }
inline float __half2float(__half h) {
  const uint32_t sign = static_cast<uint32_t>(h.bits & 0x8000u) << 16;
  const uint32_t e = (h.bits >> 10) & 0x1fu, m = h.bits & 0x3ffu;
  if (e == 0x1f) return __uint_as_float(sign | 0x7f800000u | (m << 13));  // inf / nan
  if (e == 0) {  // zero or subnormal: m * 2^-24, exact in fp32
    const float v = static_cast<float>(m) * 5.9604644775390625e-8f;
    return sign ? -v : v;
  }
  return __uint_as_float(sign | ((e + 112u) << 23) | (m << 13));
}
inline __half __float2half_rn(float f) {
  const uint32_t x = __float_as_uint(f);
  const uint16_t sign = static_cast<uint16_t>((x >> 16) & 0x8000u);
  const uint32_t ax = x & 0x7fffffffu;
  if (ax > 0x7f800000u) return __half{static_cast<uint16_t>(sign | 0x7e00u)};
  if (ax >= 0x477ff000u) return __half{static_cast<uint16_t>(sign | 0x7c00u)};  // >= 65520: inf
  if (ax < 0x38800000u) {  // below 2^-14: subnormal, m = round_even(|f| * 2^24)
    const float v = __uint_as_float(ax) * 16777216.0f;
    return __half{static_cast<uint16_t>(sign | static_cast<uint16_t>(std::nearbyint(v)))};
  }
  const uint32_t r = ax + 0xfffu + ((ax >> 13) & 1u) - 0x38000000u;
  return __half{static_cast<uint16_t>(sign | (r >> 13))};
}
inline float __bfloat162float(__nv_bfloat16 h) { return __uint_as_float(static_cast<uint32_t>(h.bits) << 16); }
inline __nv_bfloat16 __float2bfloat16_rn(float f) {
  const uint32_t x = __float_as_uint(f);
  if ((x & 0x7fffffffu) > 0x7f800000u) return __nv_bfloat16{static_cast<uint16_t>((x >> 16) | 0x40u)};
  return __nv_bfloat16{static_cast<uint16_t>((x + 0x7fffu + ((x >> 16) & 1u)) >> 16)};
}

// ------------------------------------------------------------------------------- scheduler
namespace emu {

enum class Wait { kNone, kBlock, kWarp, kDone };
enum class WarpOp { kShflXor, kShflIdx, kShflDown, kShflUp, kBallot };

struct Fiber {
  ucontext_t ctx;
  Wait wait = Wait::kNone;
  WarpOp op = WarpOp::kShflXor;
  unsigned mask = 0;
  int param = 0, width = 32;
  uint64_t value = 0, result = 0;
};

// The order in which the scheduler resumes the runnable fibers of a block: a race-free kernel
// computes the same bits under every order, so tests compare orders (a read of shared memory
// that misses its barrier reads another value in one of them).
enum class Schedule { kForward = 0, kReverse = 1, kShuffled = 2 };
struct ScheduleState {
  Schedule mode = Schedule::kForward;
  uint64_t seed = 0;
};
inline ScheduleState& schedule() {
  static ScheduleState s;
  return s;
}

struct Block {
  std::vector<Fiber> fibers;
  std::vector<int> order;
  std::vector<std::unique_ptr<char[]>> stacks;  // one per thread, kept across blocks
  ucontext_t sched;
  int current = -1;
  std::function<void()> body;
  bool failed = false;
};
inline Block& blk() {
  static Block b;
  return b;
}

inline void set_current(int i) {
  Block& b = blk();
  b.current = i;
  const unsigned bx = state().block_dim.x, by = state().block_dim.y;
  state().thread = uint3{static_cast<unsigned>(i) % bx, (static_cast<unsigned>(i) / bx) % by,
                         static_cast<unsigned>(i) / (bx * by)};
}

inline void yield_to_scheduler() {
  Block& b = blk();
  swapcontext(&b.fibers[b.current].ctx, &b.sched);
}

inline void fiber_entry() {
  blk().body();
  Block& b = blk();
  b.fibers[b.current].wait = Wait::kDone;
  // returning switches to uc_link (the scheduler)
}

inline int lane_of(int i) { return i & 31; }

// Releases the warp collectives that every lane of their mask waits at; computes their results.
inline bool release_warps(std::string& err) {
  Block& b = blk();
  const int n = static_cast<int>(b.fibers.size());
  bool progress = false;
  for (int w0 = 0; w0 < n; w0 += 32) {
    int first = -1;
    for (int i = w0; i < n && i < w0 + 32; ++i) {
      if (b.fibers[i].wait == Wait::kWarp) {
        first = i;
        break;
      }
    }
    if (first < 0) continue;
    const Fiber& f0 = b.fibers[first];
    const unsigned mask = f0.mask;
    bool ready = true;
    for (int l = 0; l < 32; ++l) {
      if (!(mask >> l & 1u)) continue;
      const int i = w0 + l;
      if (i >= n || b.fibers[i].wait == Wait::kDone) {
        err = "lane " + std::to_string(l) + " of warp " + std::to_string(w0 / 32) +
              " is in the mask of a warp collective but has exited (or does not exist)";
        return false;
      }
      const Fiber& f = b.fibers[i];
      if (f.wait != Wait::kWarp) {
        ready = false;
        continue;
      }
      if (f.mask != mask || f.op != f0.op) {
        err = "lanes of warp " + std::to_string(w0 / 32) + " wait at different warp collectives";
        return false;
      }
    }
    if (!ready) continue;
    uint64_t vals[32] = {};
    for (int l = 0; l < 32; ++l) {
      if (mask >> l & 1u) vals[l] = b.fibers[w0 + l].value;
    }
    uint64_t ballot = 0;
    for (int l = 0; l < 32; ++l) {
      if ((mask >> l & 1u) && vals[l] != 0) ballot |= 1ull << l;
    }
    for (int l = 0; l < 32; ++l) {
      if (!(mask >> l & 1u)) continue;
      Fiber& f = b.fibers[w0 + l];
      const int width = f.width, base = l & ~(width - 1);
      int src = l;
      switch (f.op) {
        case WarpOp::kShflXor: src = l ^ f.param; break;
        case WarpOp::kShflIdx: src = base + (f.param & (width - 1)); break;
        case WarpOp::kShflDown: src = (l - base) + f.param < width ? l + f.param : l; break;
        case WarpOp::kShflUp: src = (l - base) - f.param >= 0 ? l - f.param : l; break;
        default: break;
      }
      if (f.op == WarpOp::kBallot) {
        f.result = ballot;
      } else {
        if (src < 0 || src >= 32 || !(mask >> src & 1u)) {
          err = "warp shuffle reads lane " + std::to_string(src) + ", outside the mask";
          return false;
        }
        f.result = vals[src];
      }
      f.wait = Wait::kNone;
    }
    progress = true;
  }
  return progress;
}

// The shared variables already poisoned in the running block.
inline std::vector<const void*>& marked() {
  static std::vector<const void*> m;
  return m;
}

inline void shared_mark(void* p, size_t bytes) {
  for (const void* q : marked()) {
    if (q == p) return;
  }
  marked().push_back(p);
  std::memset(p, 0xff, bytes);
}

// Runs one block of `threads` fibers to completion; false (with a message) on a deadlock.
inline bool run_block(int threads, const std::function<void()>& body, std::string& err) {
  marked().clear();
  constexpr size_t kStack = 256 * 1024;
  Block& b = blk();
  b.body = body;
  b.fibers.assign(threads, Fiber{});
  while (b.stacks.size() < static_cast<size_t>(threads)) b.stacks.emplace_back(new char[kStack]);
  for (int i = 0; i < threads; ++i) {
    Fiber& f = b.fibers[i];
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = b.stacks[i].get();
    f.ctx.uc_stack.ss_size = kStack;
    f.ctx.uc_link = &b.sched;
    makecontext(&f.ctx, fiber_entry, 0);
  }
  b.order.resize(threads);
  for (int i = 0; i < threads; ++i) b.order[i] = i;
  if (schedule().mode == Schedule::kReverse) {
    for (int i = 0; i < threads; ++i) b.order[i] = threads - 1 - i;
  }
  uint64_t rng = schedule().seed * 0x9e3779b97f4a7c15ull + 1;
  for (;;) {
    if (schedule().mode == Schedule::kShuffled) {  // a new order at every round
      for (int i = threads - 1; i > 0; --i) {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        std::swap(b.order[i], b.order[static_cast<int>(rng % static_cast<uint64_t>(i + 1))]);
      }
    }
    bool ran = false;
    for (int oi = 0; oi < threads; ++oi) {
      const int i = b.order[oi];
      if (b.fibers[i].wait != Wait::kNone) continue;
      set_current(i);
      swapcontext(&b.sched, &b.fibers[i].ctx);
      ran = true;
    }
    if (ran) continue;
    int alive = 0, at_block = 0;
    for (const Fiber& f : b.fibers) {
      if (f.wait != Wait::kDone) ++alive;
      if (f.wait == Wait::kBlock) ++at_block;
    }
    if (alive == 0) return true;
    if (at_block == alive) {
      if (alive < threads) {  // the barrier is not uniform over the block
        err = std::to_string(threads - alive) + " threads exited before a __syncthreads() that " +
              std::to_string(at_block) + " others wait at (a divergent barrier)";
        return false;
      }
      for (Fiber& f : b.fibers) {
        if (f.wait == Wait::kBlock) f.wait = Wait::kNone;
      }
      continue;
    }
    if (!err.empty()) return false;
    if (release_warps(err)) continue;
    if (err.empty()) {
      err = "deadlock: " + std::to_string(at_block) + " of " + std::to_string(alive) +
            " live threads wait at __syncthreads() while the others wait at warp collectives";
    }
    return false;
  }
}

inline uint64_t warp_collective(WarpOp op, unsigned mask, uint64_t value, int param, int width) {
  Block& b = blk();
  Fiber& f = b.fibers[b.current];
  f.op = op;
  f.mask = mask;
  f.value = value;
  f.param = param;
  f.width = width;
  f.wait = Wait::kWarp;
  yield_to_scheduler();
  set_current(b.current);  // threadIdx may have been changed by other fibers
  return b.fibers[b.current].result;
}

struct Cfg {
  dim3 grid, block;
};
inline Cfg cfg(dim3 grid, dim3 block, size_t = 0, cudaStream_t = nullptr) { return Cfg{grid, block}; }

// Kernel launches so far, for tests that want to know a path was taken.
inline int64_t& launches() {
  static int64_t n = 0;
  return n;
}

template <typename... KArgs, typename... Args>
void launch(Cfg c, void (*kernel)(KArgs...), Args&&... args) {
  State& st = state();
  const uint64_t threads = uint64_t(c.block.x) * c.block.y * c.block.z;
  if (threads == 0 || threads > 1024 || c.block.z > 64 || c.grid.x == 0 || c.grid.y == 0 || c.grid.z == 0 ||
      c.grid.x > 0x7fffffffu || c.grid.y > 65535u || c.grid.z > 65535u) {
    st.last_error = cudaErrorInvalidConfiguration;
    st.message = "invalid launch configuration: grid (" + std::to_string(c.grid.x) + ", " +
                 std::to_string(c.grid.y) + ", " + std::to_string(c.grid.z) + "), block (" +
                 std::to_string(c.block.x) + ", " + std::to_string(c.block.y) + ", " + std::to_string(c.block.z) +
                 ")";
    return;
  }
  // Kernel parameters are copies, converted to the kernel's parameter types once.
  std::tuple<std::decay_t<KArgs>...> params(std::forward<Args>(args)...);
  st.block_dim = c.block;
  st.grid_dim = c.grid;
  ++launches();
  for (unsigned z = 0; z < c.grid.z; ++z) {
    for (unsigned y = 0; y < c.grid.y; ++y) {
      for (unsigned x = 0; x < c.grid.x; ++x) {
        st.block = uint3{x, y, z};
        std::string err;
        const bool ok = run_block(static_cast<int>(threads), [&] { std::apply(kernel, params); }, err);
        if (!ok) {
          st.last_error = cudaErrorLaunchFailure;
          st.message = "block (" + std::to_string(x) + ", " + std::to_string(y) + ", " + std::to_string(z) +
                       "): " + err;
          return;
        }
      }
    }
  }
}

}  // namespace emu

inline void __syncthreads() {
  emu::Block& b = emu::blk();
  b.fibers[b.current].wait = emu::Wait::kBlock;
  emu::yield_to_scheduler();
  emu::set_current(b.current);
}

template <typename T>
inline uint64_t emu_bits(T v) {
  static_assert(sizeof(T) <= 8, "shuffle of a type over 8 bytes");
  uint64_t u = 0;
  std::memcpy(&u, &v, sizeof(T));
  return u;
}
template <typename T>
inline T emu_from_bits(uint64_t u) {
  T v;
  std::memcpy(&v, &u, sizeof(T));
  return v;
}
template <typename T>
inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
  return emu_from_bits<T>(emu::warp_collective(emu::WarpOp::kShflXor, mask, emu_bits(v), lane_mask, width));
}
template <typename T>
inline T __shfl_sync(unsigned mask, T v, int src, int width = 32) {
  return emu_from_bits<T>(emu::warp_collective(emu::WarpOp::kShflIdx, mask, emu_bits(v), src, width));
}
template <typename T>
inline T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  return emu_from_bits<T>(
      emu::warp_collective(emu::WarpOp::kShflDown, mask, emu_bits(v), static_cast<int>(delta), width));
}
template <typename T>
inline T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  return emu_from_bits<T>(
      emu::warp_collective(emu::WarpOp::kShflUp, mask, emu_bits(v), static_cast<int>(delta), width));
}
inline unsigned __ballot_sync(unsigned mask, int pred) {
  return static_cast<unsigned>(emu::warp_collective(emu::WarpOp::kBallot, mask, pred ? 1 : 0, 0, 32));
}

// Fibers switch only at sync points, so a read-modify-write is atomic here.
template <typename T>
inline T atomicAdd(T* p, T v) {
  const T old = *p;
  *p = old + v;
  return old;
}
