// Host emulation of the CUDA execution model, for running the kernels of csrc/cuda/ on the CPU in
// tests (included by common/simt.cuh when FUSENORM_SIMT_HOST is defined; never in a real build).
//
// A launch runs the blocks of the grid one after another. The threads of a block are fibers on one
// OS thread, switched only where CUDA threads synchronise: __syncthreads, warp
// shuffles and __syncwarp. Between two such points the ready threads run in a seeded random order,
// so a kernel that reads shared memory another thread writes without a barrier between them reads
// a stale value. What is modelled, and checked (a violation throws fusenorm::simt::host::Error,
// which reaches Python as a RuntimeError):
//  * __syncthreads is a barrier of every thread of the block: it releases when all have arrived at
//    the same call site; threads at different sites, or a thread that exits while others wait,
//    are an error (CUDA leaves both undefined), as is a block where no thread can make progress.
//  * __shfl_{sync,up_sync,down_sync,xor_sync} and __syncwarp exchange values among the lanes of a
//    warp named in the mask, with CUDA's width segments and out-of-segment rules. The calling lane
//    must be in the mask, every lane of the mask must take part, and a lane may only read a lane
//    of the mask.
//  * shared memory: static __shared__ arrays are per block (one block runs at a time); dynamic
//    shared memory is sized by the launch, filled with 0xff (NaN) bytes for each block, and a
//    launch above 48 KiB needs allow_dynamic_smem first, up to DeviceLimits::smem_optin.
//  * 16-byte vector accesses (load_vec/store_vec) must be aligned to their size.
//  * launch configuration: 1..1024 threads per block, a non-empty grid.
// Not modelled: true concurrency (warps do not interleave inside a segment), timing, memory
// fences, atomics, out-of-bounds global accesses (beyond what a wrong answer shows).
#pragma once
#include <cxxabi.h>
#include <dlfcn.h>
#include <sys/mman.h>
#include <ucontext.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <functional>
#include <map>
#include <numeric>
#include <random>
#include <stdexcept>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
using cudaStream_t = struct CUstream_st*;

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static thread_local
#define FUSENORM_DYNAMIC_SMEM(T, name) T* name = ::fusenorm::simt::host::dynamic_smem<T>()
#define FUSENORM_CHECK_ALIGNED(ptr, bytes) ::fusenorm::simt::host::check_aligned(ptr, bytes, __FILE__, __LINE__)

namespace fusenorm::simt {
namespace host {

struct Error : std::runtime_error {
  using std::runtime_error::runtime_error;
};

enum class State { Ready, AtBarrier, AtWarp, Done };
enum class WarpOp { Sync, Idx, Up, Down, Xor };

// Fiber switching. On x86-64 a minimal switch of the callee-saved registers and the stack pointer
// (ucontext's swapcontext makes a system call per switch, and a block switches millions of times);
// elsewhere ucontext.
#if defined(__x86_64__)
extern "C" void fusenorm_simt_switch(void** save_sp, void* load_sp);
asm(R"(
  .text
  .weak fusenorm_simt_switch
  .type fusenorm_simt_switch, @function
fusenorm_simt_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size fusenorm_simt_switch, .-fusenorm_simt_switch
)");
struct Context {
  void* sp = nullptr;
  void start(char* stack, size_t bytes, void (*entry)()) {
    void** p = reinterpret_cast<void**>(reinterpret_cast<uintptr_t>(stack + bytes) & ~uintptr_t(15));
    *--p = nullptr;                           // entry's return address: it never returns
    *--p = reinterpret_cast<void*>(entry);    // where the first switch "returns" to
    for (int i = 0; i < 6; ++i) *--p = nullptr;  // rbp rbx r12-r15
    sp = p;
  }
};
inline void switch_context(Context& from, Context& to) { fusenorm_simt_switch(&from.sp, to.sp); }
#else
struct Context {
  ucontext_t uc;
  void start(char* stack, size_t bytes, void (*entry)()) {
    getcontext(&uc);
    uc.uc_stack.ss_sp = stack;
    uc.uc_stack.ss_size = bytes;
    uc.uc_link = nullptr;
    makecontext(&uc, entry, 0);
  }
};
inline void switch_context(Context& from, Context& to) { swapcontext(&from.uc, &to.uc); }
#endif

struct Thread {
  Context ctx;
  dim3 idx;
  int linear = 0;
  State state = State::Ready;
  const char* file = "";  // site of the barrier or warp op it waits at
  int line = 0;
  unsigned mask = 0;  // warp op
  WarpOp op = WarpOp::Sync;
  int arg = 0;
  int width = 32;
  uint64_t in = 0, out = 0;
};

// What the emulated device reports and how it schedules; set from the tests.
struct Options {
  int sms = 4;
  int smem_optin = 227 * 1024;
  int blocks_per_sm = 2;
  uint64_t seed = 0x5eed;
};
inline Options& options() {
  static Options o;
  return o;
}

// Names of the kernels launched since the last take_launch_log().
inline std::vector<std::string>& launch_log() {
  static std::vector<std::string> log;
  return log;
}

struct Block {
  dim3 grid, dim, idx;
  std::vector<Thread> threads;
  std::vector<unsigned char> smem;
  Context sched;
  Thread* cur = nullptr;
  const std::function<void()>* body = nullptr;
  std::exception_ptr error;
  std::string error_at;
};
inline thread_local Block* g_block = nullptr;

inline std::string str(dim3 d) {
  return "(" + std::to_string(d.x) + "," + std::to_string(d.y) + "," + std::to_string(d.z) + ")";
}

inline std::string where(const Block& b, const Thread& t) {
  return "block " + str(b.idx) + " thread " + str(t.idx);
}

inline void fail(const std::string& msg) { throw Error("simt: " + msg); }
// From inside a kernel thread: the scheduler prefixes the block and thread.
inline void fail_in_thread(const std::string& msg) { throw Error(msg); }

inline Thread& current() {
  if (!g_block || !g_block->cur) fail("device code called outside a kernel launch");
  return *g_block->cur;
}

// Fiber stacks, reused by every launch on this OS thread; a guard page below each.
constexpr size_t kStackBytes = 128 * 1024;
inline char* stack(int i) {
  static thread_local std::vector<char*> stacks;
  while (static_cast<int>(stacks.size()) <= i) {
    void* p = mmap(nullptr, kStackBytes + 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) fail("cannot allocate a fiber stack");
    mprotect(p, 4096, PROT_NONE);
    stacks.push_back(static_cast<char*>(p) + 4096);
  }
  return stacks[i];
}

inline void yield(State s) {
  Thread& t = current();
  t.state = s;
  switch_context(t.ctx, g_block->sched);
}

inline void thread_entry() {
  Block* b = g_block;
  Thread* t = b->cur;
  try {
    (*b->body)();
  } catch (...) {
    if (!b->error) {
      b->error = std::current_exception();
      b->error_at = where(*b, *t);
    }
  }
  t->state = State::Done;
  switch_context(t->ctx, b->sched);  // never resumed
}

inline void syncthreads(const char* file, int line) {
  Thread& t = current();
  t.file = file;
  t.line = line;
  yield(State::AtBarrier);
}

template <typename T>
T warp_op(WarpOp op, unsigned mask, T v, int arg, int width, const char* file, int line) {
  static_assert(sizeof(T) <= sizeof(uint64_t) && std::is_trivially_copyable_v<T>, "shuffle of a type wider than 8 bytes");
  Thread& t = current();
  const int lane = t.linear % 32;
  if (!((mask >> lane) & 1u)) fail_in_thread("lane " + std::to_string(lane) + " calls a warp op at " + file + ":" + std::to_string(line) + " with a mask that excludes it");
  if (width < 1 || width > 32 || (width & (width - 1))) fail_in_thread("shuffle width " + std::to_string(width) + " is not a power of two <= 32");
  t.mask = mask;
  t.op = op;
  t.arg = arg;
  t.width = width;
  t.in = 0;
  std::memcpy(&t.in, &v, sizeof(T));
  t.file = file;
  t.line = line;
  yield(State::AtWarp);
  T r;
  std::memcpy(&r, &t.out, sizeof(T));
  return r;
}

inline bool same_site(const Thread& a, const Thread& b) { return a.line == b.line && std::strcmp(a.file, b.file) == 0; }

inline std::string site(const Thread& t) { return std::string(t.file) + ":" + std::to_string(t.line); }

// Completes the warp ops whose every lane has arrived; returns whether any did.
inline bool resolve_warps(Block& b) {
  bool released = false;
  const int n = static_cast<int>(b.threads.size());
  for (int w0 = 0; w0 < n; w0 += 32) {
    for (int l = 0; l < 32 && w0 + l < n; ++l) {
      Thread& t = b.threads[w0 + l];
      if (t.state != State::AtWarp) continue;
      bool complete = true;
      for (int j = 0; j < 32; ++j) {
        if (!((t.mask >> j) & 1u)) continue;
        if (w0 + j >= n) fail(where(b, t) + ": warp op at " + site(t) + " names lane " + std::to_string(j) + ", which does not exist in a block of " + std::to_string(n) + " threads");
        const Thread& o = b.threads[w0 + j];
        if (o.state == State::Done) fail(where(b, t) + ": warp op at " + site(t) + " waits for lane " + std::to_string(j) + ", which has exited");
        if (o.state == State::AtWarp && (o.mask != t.mask || !same_site(o, t) || o.op != t.op || o.width != t.width))
          fail(where(b, t) + ": lanes of a warp disagree: lane " + std::to_string(l) + " at " + site(t) + " and lane " + std::to_string(j) + " at " + site(o) + " (masks " + std::to_string(t.mask) + ", " + std::to_string(o.mask) + ")");
        if (o.state != State::AtWarp) complete = false;
      }
      if (!complete) continue;
      for (int j = 0; j < 32; ++j) {
        if (!((t.mask >> j) & 1u)) continue;
        Thread& d = b.threads[w0 + j];
        const int seg = j & ~(d.width - 1);
        int src = j;
        switch (d.op) {
          case WarpOp::Sync: break;
          case WarpOp::Idx: src = seg + (d.arg & (d.width - 1)); break;
          case WarpOp::Up: src = j - d.arg >= seg ? j - d.arg : j; break;
          case WarpOp::Down: src = j + d.arg < seg + d.width ? j + d.arg : j; break;
          case WarpOp::Xor: src = j ^ d.arg; src = (src >= seg && src < seg + d.width) ? src : j; break;
        }
        if (!((t.mask >> src) & 1u)) fail(where(b, d) + ": shuffle at " + site(d) + " reads lane " + std::to_string(src) + ", outside the mask");
        d.out = b.threads[w0 + src].in;
      }
      for (int j = 0; j < 32; ++j)
        if ((t.mask >> j) & 1u) b.threads[w0 + j].state = State::Ready;
      released = true;
    }
  }
  return released;
}

// Releases a __syncthreads every thread has reached; returns whether it did.
inline bool resolve_barrier(Block& b) {
  int at = 0, done = 0;
  const Thread* first = nullptr;
  for (const Thread& t : b.threads) {
    if (t.state == State::Ready || t.state == State::AtWarp) return false;
    if (t.state == State::Done) ++done;
    if (t.state == State::AtBarrier) {
      ++at;
      if (!first) first = &t;
    }
  }
  if (at == 0) return false;
  if (done > 0) fail("block " + str(b.idx) + ": " + std::to_string(done) + " threads exited while " + std::to_string(at) + " wait at __syncthreads at " + site(*first));
  for (const Thread& t : b.threads)
    if (!same_site(t, *first)) fail("block " + str(b.idx) + ": threads disagree on __syncthreads: " + site(*first) + " and " + site(t));
  for (Thread& t : b.threads) t.state = State::Ready;
  return true;
}

inline std::string describe_stuck(const Block& b) {
  std::map<std::string, int> counts;
  for (const Thread& t : b.threads) {
    switch (t.state) {
      case State::AtBarrier: counts["__syncthreads at " + site(t)]++; break;
      case State::AtWarp: counts["warp op at " + site(t)]++; break;
      case State::Done: counts["exited"]++; break;
      case State::Ready: counts["ready"]++; break;
    }
  }
  std::string s;
  for (auto& [k, v] : counts) s += (s.empty() ? "" : ", ") + std::to_string(v) + " " + k;
  return s;
}

inline void run_block(Block& b, uint64_t seed) {
  const int n = static_cast<int>(b.dim.x * b.dim.y * b.dim.z);
  b.threads.assign(n, Thread{});
  for (int i = 0; i < n; ++i) {
    Thread& t = b.threads[i];
    t.linear = i;
    t.idx = dim3(i % b.dim.x, (i / b.dim.x) % b.dim.y, i / (b.dim.x * b.dim.y));
    t.ctx.start(stack(i), kStackBytes, thread_entry);
  }
  std::fill(b.smem.begin(), b.smem.end(), 0xff);
  std::mt19937_64 rng(seed);
  std::vector<int> order(n);
  std::iota(order.begin(), order.end(), 0);
  for (;;) {
    std::shuffle(order.begin(), order.end(), rng);
    bool ran = false;
    for (int i : order) {
      Thread& t = b.threads[i];
      if (t.state != State::Ready) continue;
      b.cur = &t;
      switch_context(b.sched, t.ctx);
      b.cur = nullptr;
      ran = true;
      if (b.error) {
        try {
          std::rethrow_exception(b.error);
        } catch (const std::exception& e) {
          fail(b.error_at + ": " + e.what());
        }
      }
    }
    const bool released = resolve_warps(b) | resolve_barrier(b);
    if (std::all_of(b.threads.begin(), b.threads.end(), [](const Thread& t) { return t.state == State::Done; }))
      return;
    if (!ran && !released) fail("block " + str(b.idx) + " cannot make progress: " + describe_stuck(b));
  }
}

template <typename T>
T* dynamic_smem() {
  Block* b = g_block;
  return b->smem.empty() ? nullptr : reinterpret_cast<T*>(b->smem.data());
}

inline void check_aligned(const void* p, size_t bytes, const char* file, int line) {
  if (reinterpret_cast<uintptr_t>(p) % bytes != 0)
    fail_in_thread("misaligned " + std::to_string(bytes) + "-byte vector access at " + file + ":" + std::to_string(line));
}

inline std::string kernel_name(const void* fn) {
  Dl_info info;
  if (dladdr(fn, &info) && info.dli_sname) {
    int status = 0;
    char* d = abi::__cxa_demangle(info.dli_sname, nullptr, nullptr, &status);
    std::string s = status == 0 && d ? d : info.dli_sname;
    std::free(d);
    return s;
  }
  return "kernel";
}

inline std::map<const void*, size_t>& smem_allowance() {
  static std::map<const void*, size_t> m;
  return m;
}

}  // namespace host

struct DeviceLimits {
  int sms = 0;
  int smem_optin = 0;
  int max_cluster = 1;  // the emulator runs one block at a time: clusters of one block only
};

inline DeviceLimits device_limits(int) { return {host::options().sms, host::options().smem_optin, 1}; }

template <typename... P>
int max_active_blocks(void (*)(P...), int, size_t) {
  return host::options().blocks_per_sm;
}

template <typename... P>
void allow_dynamic_smem(void (*kernel)(P...), size_t bytes) {
  if (bytes > static_cast<size_t>(host::options().smem_optin))
    host::fail("cudaFuncSetAttribute: " + std::to_string(bytes) + " bytes of dynamic shared memory exceed the opt-in limit");
  if (bytes > 48 * 1024) host::smem_allowance()[reinterpret_cast<const void*>(kernel)] = bytes;
}

template <typename... P, typename... Args>
void launch(void (*kernel)(P...), dim3 grid, dim3 block, size_t smem, cudaStream_t, Args&&... args) {
  using namespace host;
  const void* key = reinterpret_cast<const void*>(kernel);
  const std::string name = kernel_name(key);
  const uint64_t threads = uint64_t(block.x) * block.y * block.z;
  if (threads == 0 || threads > 1024 || grid.x == 0 || grid.y == 0 || grid.z == 0)
    fail(name + ": invalid launch configuration: grid " + str(grid) + ", block " + str(block));
  size_t allowed = 48 * 1024;
  if (auto it = smem_allowance().find(key); it != smem_allowance().end()) allowed = it->second;
  if (smem > allowed) fail(name + ": " + std::to_string(smem) + " bytes of dynamic shared memory, " + std::to_string(allowed) + " allowed");
  launch_log().push_back(name + " grid=" + str(grid) + " block=" + str(block) + " smem=" + std::to_string(smem));

  std::tuple<std::decay_t<P>...> params(std::forward<Args>(args)...);
  const std::function<void()> body = [&] { std::apply(kernel, params); };
  Block b;
  b.grid = grid;
  b.dim = block;
  b.smem.resize(smem);
  b.body = &body;
  Block* outer = g_block;
  g_block = &b;
  struct Restore {
    Block* o;
    ~Restore() { g_block = o; }
  } restore{outer};
  uint64_t seed = options().seed;
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) {
        b.idx = dim3(x, y, z);
        b.error = nullptr;
        run_block(b, seed++);
      }
  options().seed = seed;
}

// The emulator has no clusters (as code compiled before sm_90) and its static shared memory is
// outside the dynamic limit.
struct KernelInfo {
  int ptx_version = 0;
  size_t static_smem = 0;
};
template <typename... P>
KernelInfo kernel_info(void (*)(P...)) {
  return {};
}

template <typename... P, typename... Args>
void launch_cluster(void (*kernel)(P...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream, int cluster,
                    Args&&... args) {
  if (cluster != 1) host::fail(host::kernel_name(reinterpret_cast<const void*>(kernel)) + ": clusters of " + std::to_string(cluster) + " blocks: the emulator runs clusters of one");
  launch(kernel, grid, block, smem, stream, std::forward<Args>(args)...);
}

template <typename... P>
int max_active_clusters(void (*kernel)(P...), int cluster, int threads, size_t smem) {
  return cluster == 1 && max_active_blocks(kernel, threads, smem) > 0 ? 1 : 0;
}

// A block is its own cluster.
inline int cluster_blocks() { return 1; }
inline int cluster_rank() { return 0; }
template <typename T>
T* cluster_map(T* p, int) {
  return p;
}

struct DeviceGuard {
  explicit DeviceGuard(const at::Tensor&) {}
};

inline cudaStream_t current_stream() { return nullptr; }

inline float rsqrt(float v) { return 1.0f / std::sqrt(v); }
inline double rsqrt(double v) { return 1.0 / std::sqrt(v); }
inline float mul_rn(float a, float b) { return a * b; }
inline double mul_rn(double a, double b) { return a * b; }

}  // namespace fusenorm::simt

#define threadIdx (::fusenorm::simt::host::current().idx)
#define blockIdx (::fusenorm::simt::host::g_block->idx)
#define blockDim (::fusenorm::simt::host::g_block->dim)
#define gridDim (::fusenorm::simt::host::g_block->grid)
#define warpSize 32
#define __syncthreads() ::fusenorm::simt::host::syncthreads(__FILE__, __LINE__)
#define __syncwarp(...) ::fusenorm::simt::host::syncwarp(__FILE__, __LINE__ __VA_OPT__(, ) __VA_ARGS__)

namespace fusenorm::simt {
inline void cluster_sync() { __syncthreads(); }
}  // namespace fusenorm::simt

namespace fusenorm::simt::host {
inline void syncwarp(const char* file, int line, unsigned mask = 0xffffffffu) {
  warp_op<int>(WarpOp::Sync, mask, 0, 0, 32, file, line);
}
}  // namespace fusenorm::simt::host

// The shuffles, with the call site for the emulator's messages.
#define __shfl_sync(mask, v, src, ...) \
  ::fusenorm::simt::host::shfl(::fusenorm::simt::host::WarpOp::Idx, mask, v, src, __FILE__, __LINE__ __VA_OPT__(, ) __VA_ARGS__)
#define __shfl_up_sync(mask, v, d, ...) \
  ::fusenorm::simt::host::shfl(::fusenorm::simt::host::WarpOp::Up, mask, v, d, __FILE__, __LINE__ __VA_OPT__(, ) __VA_ARGS__)
#define __shfl_down_sync(mask, v, d, ...) \
  ::fusenorm::simt::host::shfl(::fusenorm::simt::host::WarpOp::Down, mask, v, d, __FILE__, __LINE__ __VA_OPT__(, ) __VA_ARGS__)
#define __shfl_xor_sync(mask, v, m, ...) \
  ::fusenorm::simt::host::shfl(::fusenorm::simt::host::WarpOp::Xor, mask, v, m, __FILE__, __LINE__ __VA_OPT__(, ) __VA_ARGS__)

namespace fusenorm::simt::host {
template <typename T>
T shfl(WarpOp op, unsigned mask, T v, int arg, const char* file, int line, int width = 32) {
  return warp_op<T>(op, mask, v, arg, width, file, line);
}
}  // namespace fusenorm::simt::host
