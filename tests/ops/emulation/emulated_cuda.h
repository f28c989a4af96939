// CUDA's execution model on the CPU, so that mmattn's kernel sources (mmattn/ops/csrc/*.cuh) can
// be compiled by the host compiler and run in the tests on a machine without a GPU.
//
// A launch runs the grid's blocks one after another, in index order in a kernel's first launch
// and in reverse in its next, by turns, so that a block that reads what another block of the
// launch writes (an order the GPU does not keep) reads it unwritten in one of the two (a
// thread-block cluster's blocks at the same time, cluster_sync() a barrier of all their
// threads; a cooperative launch's whole grid at once). Each CUDA thread is a fiber (its own
// stack, switched to and from on the calling OS thread): a thread runs until it waits at a
// barrier (__syncthreads(), a barrier of the block; the warp shuffles and __syncwarp(), of the
// warp; cluster_sync()) or ends, then the next runs. The scheduler takes a warp at a time and
// runs it up to its next barrier of the block (its lanes passing their warp barriers among
// themselves), the warps in index order and in reverse by turns, and the lanes likewise, so
// that a step that reads what another thread (or warp) writes in the same step (a missing
// barrier) runs before the write in one of the orders, and a warp that runs ahead overwrites
// what a later warp has yet to read: deterministically. Threads that wait at barriers not all
// of them reach end the launch with an error (a deadlock) rather than hang the test. (Until
// 2026-11-27 each CUDA thread ran on an OS thread with real barriers: 4.6 minutes of the suite
// on 2 cores, most of it in the kernel's futex calls; 13 seconds with fibers.)
// Dynamic shared memory is one buffer per block that runs at once (MMATTN_BLOCK_SHARED picks the
// block's: a kernel launched in clusters or cooperatively takes its shared memory through it),
// filled with 0xFF bytes (NaN for floating point) before each block so that a read of shared
// memory nobody wrote shows up in the results. What cannot be seen here: the GPU's memory
// model (the threads of a step run one after another, each to its next barrier), performance,
// and errors that only the device's limits produce. This provides the interface of
// mmattn/ops/csrc/cuda_launch.cuh.
//
// Each kernel family declares its dynamic shared memory (`extern __shared__ ... smem_raw[]`) in
// its own namespace; the translation unit that includes a family defines that array with
// MMATTN_EMULATED_SHARED_MEMORY(namespace).
#pragma once

// the headers the kernels use, before the CUDA keywords are defined away below
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/core/Device.h>

#include <sys/mman.h>
#if !defined(__x86_64__)
#include <ucontext.h>
#endif

#include <algorithm>
#include <atomic>
#include <array>
#include <cmath>
#include <cstdio>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <limits>
#include <map>
#include <memory>
#include <type_traits>
#include <utility>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__
#define __align__(n) __attribute__((aligned(n)))

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

inline dim3 gridDim, blockDim;  // shared by the threads of the running launch

using std::max;
using std::min;

namespace mmattn_emulation {

struct ClusterOrder;
struct Fiber;
inline Fiber* current = nullptr;  // the CUDA thread that runs now

// A barrier of `expected` threads: an arriving thread waits (its fiber yields) until the last
// one arrives; that one opens the next generation.
struct Barrier {
  unsigned expected = 0, arrived = 0;
  uint64_t generation = 0;
  explicit Barrier(unsigned n) : expected(n) {}
  void arrive_and_wait();
  void arrive_and_drop() {  // an exited thread no longer holds the others up
    --expected;
    if (arrived > 0 && arrived == expected) release();
  }
  void release() {
    arrived = 0;
    ++generation;
  }
};

// A lane's slot in a warp shuffle: its value and the number of the shuffle (the lane's count of
// shuffles) that wrote it.
struct ShuffleSlot {
  double value = 0;
  unsigned shuffle = ~0u;  // (none yet)
};

struct Block {
  Barrier* threads = nullptr;
  std::vector<Barrier>* warps = nullptr;
  std::vector<ShuffleSlot>* exchange = nullptr;  // the warp shuffles' slots, two sets a warp
  Barrier* cluster = nullptr;  // all threads of the block's cluster
  Barrier* grid = nullptr;     // all threads of a cooperative launch (else none)
  unsigned slot = 0;           // the block's shared memory among those running
  unsigned rank = 0;           // its place in its cluster
  unsigned cluster_blocks = 1;
  ClusterOrder* order = nullptr;
};

struct PendingCopy {  // an asynchronous copy (below) not yet waited for
  void* dst;
  const void* src;
  bool valid;
};

// A CUDA thread: its stack, the registers saved while it is switched out, its indices and
// block, and what it waits for.
struct Fiber {
#if defined(__x86_64__)
  void* sp = nullptr;
#else
  ucontext_t context;
#endif
  unsigned char* stack = nullptr;  // kStackBytes, above a guard page
  dim3 block_idx, thread_idx;
  Block block;
  unsigned cluster_barriers = 0;  // reached so far
  unsigned shuffles = 0;          // warp shuffles so far (which set of slots the next one uses)
  std::vector<PendingCopy> pending_copies;
  const std::function<void()>* body = nullptr;
  const Barrier* barrier = nullptr;  // waits for this barrier's generation to pass `generation`
  uint64_t generation = 0;
  unsigned others_at = 0;  // waits for the other blocks at this cluster barrier (0: none)
  bool done = false;
};

}  // namespace mmattn_emulation

#define threadIdx (::mmattn_emulation::current->thread_idx)
#define blockIdx (::mmattn_emulation::current->block_idx)

namespace mmattn_emulation {

constexpr size_t kSharedMemoryBytes = 227 * 1024;  // an H100's opt-in limit per block
constexpr unsigned kMaxClusterBlocks = 8;          // the portable cluster size
// one per kernel family, kMaxClusterBlocks blocks' worth
inline std::vector<unsigned char*> shared_memories;
inline int64_t launches = 0;                         // kernel launches so far (for the tests)
// each kernel's launches so far (launch_clusters alternates the order of a kernel's blocks)
inline std::map<const void*, unsigned> launch_counts;

// The last block of a cluster runs each step between cluster barriers only once the other
// blocks have run theirs (reached the next barrier, or exited), so that a step missing a cluster
// barrier shows: the others write what the last block has yet to read, or read what it has yet
// to write. Per barrier, the count of the other blocks' threads that have reached it.
constexpr unsigned kMaxClusterBarriers = 64;  // a kernel's cluster barriers, at most

struct ClusterOrder {
  unsigned others = 0;  // the other blocks' threads
  std::array<unsigned, kMaxClusterBarriers + 2> reached{};
};

inline bool last_of_cluster() {
  const Block& b = current->block;
  return b.cluster_blocks > 1 && b.rank + 1 == b.cluster_blocks;
}

inline void reach(unsigned barrier) { ++current->block.order->reached[barrier]; }

inline bool register_shared_memory(unsigned char* memory) {
  shared_memories.push_back(memory);
  return true;
}

// ---- switching between fibers: x86-64 saves the callee-saved registers and the floating-point
// control words on the stack it leaves (no system call, unlike swapcontext's signal mask);
// other machines use <ucontext.h>.
constexpr size_t kStackBytes = 256 * 1024, kGuardBytes = 4096;

#if defined(__x86_64__)
extern "C" void mmattn_emulation_switch(void** save_sp, void* to_sp);
asm(R"(
  .pushsection .text
  .weak mmattn_emulation_switch
  .type mmattn_emulation_switch, @function
mmattn_emulation_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size mmattn_emulation_switch, .-mmattn_emulation_switch
  .popsection
)");

inline void* scheduler_sp = nullptr;

// A stack that "returns" into entry (as if called: rsp = 8 mod 16) with the scheduler's
// floating-point control words.
inline void prepare(Fiber& f, void (*entry)()) {
  uint32_t mxcsr;
  uint16_t fpcw;
  asm volatile("stmxcsr %0" : "=m"(mxcsr));
  asm volatile("fnstcw %0" : "=m"(fpcw));
  auto* sp = reinterpret_cast<uint64_t*>(f.stack + kStackBytes);
  *--sp = 0;                                   // entry's return address: it never returns
  *--sp = reinterpret_cast<uint64_t>(entry);  // where the switch's `ret` goes
  for (int r = 0; r < 6; ++r) *--sp = 0;      // rbp, rbx, r12-r15
  *--sp = (static_cast<uint64_t>(fpcw) << 32) | mxcsr;
  f.sp = sp;
}
inline void switch_in(Fiber& f) { mmattn_emulation_switch(&scheduler_sp, f.sp); }
inline void switch_out(Fiber& f) { mmattn_emulation_switch(&f.sp, scheduler_sp); }
#else
inline ucontext_t scheduler_context;
inline void prepare(Fiber& f, void (*entry)()) {
  getcontext(&f.context);
  f.context.uc_stack.ss_sp = f.stack;
  f.context.uc_stack.ss_size = kStackBytes;
  f.context.uc_link = nullptr;
  makecontext(&f.context, entry, 0);
}
inline void switch_in(Fiber& f) { swapcontext(&scheduler_context, &f.context); }
inline void switch_out(Fiber& f) { swapcontext(&f.context, &scheduler_context); }
#endif

inline void fail(const char* message) {
  std::fprintf(stderr, "emulated CUDA: %s\n", message);
  std::abort();
}

// the calling fiber waits: back to the scheduler, which switches to it again once it can run
inline void yield() { switch_out(*current); }

inline void Barrier::arrive_and_wait() {
  Fiber& f = *current;
  f.barrier = this;
  f.generation = generation;
  if (++arrived == expected) release();
  yield();
  f.barrier = nullptr;
}

// (the last block's threads) until the other blocks' threads have reached `barrier`
inline void wait_for_others(unsigned barrier) {
  current->others_at = barrier;
  yield();
  current->others_at = 0;
}

inline bool runnable(const Fiber& f) {
  return !f.done && !(f.barrier && f.barrier->generation == f.generation) &&
         !(f.others_at && f.block.order->reached[f.others_at] < f.block.order->others);
}

inline void fiber_entry() {
  Fiber& f = *current;
  (*f.body)();
  f.done = true;
  switch_out(f);
  fail("a finished thread was resumed");
}

// The fibers, with their stacks, kept from launch to launch (never freed: the process's exit
// frees them); the first `count`, ready to run `body`.
inline std::vector<Fiber*> fibers(unsigned count, const std::function<void()>& body) {
  static std::vector<std::unique_ptr<Fiber>> pool;
  while (pool.size() < count) {
    void* memory = mmap(nullptr, kGuardBytes + kStackBytes, PROT_READ | PROT_WRITE,
                        MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (memory == MAP_FAILED || mprotect(memory, kGuardBytes, PROT_NONE) != 0)
      fail("no memory for a thread's stack");
    pool.push_back(std::make_unique<Fiber>());
    pool.back()->stack = static_cast<unsigned char*>(memory) + kGuardBytes;
  }
  std::vector<Fiber*> ready;
  for (unsigned t = 0; t < count; ++t) {
    Fiber& f = *pool[t];
    f.cluster_barriers = f.shuffles = f.others_at = 0;
    f.pending_copies.clear();
    f.body = &body;
    f.barrier = nullptr;
    f.done = false;
    prepare(f, fiber_entry);
    ready.push_back(&f);
  }
  return ready;
}

// Runs the fibers (blocks of `threads`) to their ends, a warp at a time: sweeps over the warps,
// forwards and backwards by turns (the first sweep forwards in one run, backwards in the next,
// so that a step a kernel takes once, such as a block's final merge, runs in both orders over
// a launch's blocks), and in a warp's turn runs its lanes (switching to each that
// can run until it waits or ends; the lanes in the sweep's order, then the other way and back)
// until none of them can run. A warp's own barriers (shuffles, __syncwarp) pass within its
// turn, so that it runs ahead to its next barrier of the block or cluster before the next warp
// starts: warps as far apart as they can get on the GPU. A sweep that runs none while some
// wait is a deadlock (threads waiting at different barriers): an error of the launch.
inline void run(const std::vector<Fiber*>& fs, unsigned threads) {
  const size_t n = fs.size();
  std::vector<std::pair<size_t, size_t>> warps;  // [begin, end) of each warp's lanes in fs
  for (size_t b = 0; b < n; b += threads)
    for (size_t w = b; w < b + threads; w += 32)
      warps.emplace_back(w, std::min<size_t>(w + 32, b + threads));
  size_t done = 0;
  static unsigned runs = 0;  // (the first sweep's direction alternates from run to run)
  for (bool forward = runs++ % 2 == 0; done < n; forward = !forward) {
    bool ran = false;
    for (size_t k = 0; k < warps.size(); ++k) {
      const auto [begin, end] = warps[forward ? k : warps.size() - 1 - k];
      bool lanes_forward = forward;
      for (bool warp_ran = true; warp_ran; lanes_forward = !lanes_forward) {
        warp_ran = false;
        for (size_t i = 0; i < end - begin; ++i) {
          Fiber& f = *fs[lanes_forward ? begin + i : end - 1 - i];
          if (!runnable(f)) continue;
          current = &f;
          switch_in(f);
          warp_ran = ran = true;
          done += f.done;
        }
      }
    }
    current = nullptr;
    // (the waiting fibers are left as they are: their stacks are taken again by the next launch)
    TORCH_CHECK(ran, "emulated CUDA: deadlock: threads wait at barriers that not all of them "
                "reach (a __syncthreads, warp operation or cluster barrier under a condition)");
  }
}

}  // namespace mmattn_emulation

inline void __syncthreads() { mmattn_emulation::current->block.threads->arrive_and_wait(); }

namespace mmattn_emulation {
// The warp shuffles: every lane of the warp posts its value, then, after a barrier of the warp,
// takes lane `source`'s. Consecutive shuffles use the warp's two sets of slots by turns, so
// that a lane writes a set only once every lane has read it (passed the next barrier). A source
// lane that did not post in the same shuffle (it has exited, is past the block's last thread,
// or is elsewhere) gives junk, NaN for floating point: its value is undefined on the GPU.
template <typename T>
inline T shuffle_from(T value, unsigned source) {
  Fiber& f = *current;
  const unsigned warp = f.thread_idx.x / 32, lane = f.thread_idx.x % 32, n = f.shuffles++;
  ShuffleSlot* slots = f.block.exchange->data() + (2 * warp + n % 2) * 32;
  slots[lane] = {static_cast<double>(value), n};
  (*f.block.warps)[warp].arrive_and_wait();
  const ShuffleSlot& from = slots[source % 32];
  if (from.shuffle == n) return static_cast<T>(from.value);
  if constexpr (std::is_floating_point_v<T>)
    return std::numeric_limits<T>::quiet_NaN();
  else
    return std::numeric_limits<T>::max();
}
}  // namespace mmattn_emulation

template <typename T>
inline T __shfl_xor_sync(unsigned, T value, int lane_mask) {
  const unsigned lane = threadIdx.x % 32;
  return mmattn_emulation::shuffle_from(value, lane ^ static_cast<unsigned>(lane_mask));
}

template <typename T>
inline T __shfl_sync(unsigned, T value, int src_lane) {
  return mmattn_emulation::shuffle_from(value, static_cast<unsigned>(src_lane));
}

inline float __expf(float v) { return std::exp(v); }

// __syncwarp(): a barrier of the warp (orders its lanes' shared-memory accesses, as on the GPU)
inline void __syncwarp(unsigned = 0xffffffffu) {
  (*mmattn_emulation::current->block.warps)[threadIdx.x / 32].arrive_and_wait();
}

// A vector access (vector.cuh's load_pack / store_pack) off its alignment: the GPU stops the
// kernel ("misaligned address"), the CPU would not notice; here it ends the process with the
// address and width, so that a test cannot pass a kernel that the GPU would refuse.
#define MMATTN_CHECK_ALIGNMENT(pointer, bytes) mmattn_emulation::check_aligned(pointer, bytes)
namespace mmattn_emulation {
inline void check_aligned(const void* pointer, size_t bytes) {
  if (reinterpret_cast<uintptr_t>(pointer) % bytes != 0) {
    std::fprintf(stderr, "emulated CUDA: misaligned %zu-byte vector access at %p\n", bytes,
                 pointer);
    std::abort();
  }
}
}  // namespace mmattn_emulation

// The asynchronous copies of vector.cuh (copy_16_async, cp.async on the GPU): the 16 bytes are
// written at the thread's wait_copies(), not at the call, and the destination reads 0xFF bytes
// (NaN) in between, so that a read before the wait, or a copy into a buffer that another thread
// still reads, shows up in the results; a thread that ends with copies it never waited for
// stops the test.
#define MMATTN_EMULATED_ASYNC_COPY(dst, src, valid) \
  mmattn_emulation::async_copy_16(dst, src, valid)
#define MMATTN_EMULATED_ASYNC_WAIT() mmattn_emulation::wait_async_copies()
namespace mmattn_emulation {
inline void async_copy_16(void* dst, const void* src, bool valid) {
  std::memset(dst, 0xFF, 16);
  current->pending_copies.push_back({dst, src, valid});
}

inline void wait_async_copies() {
  std::vector<PendingCopy>& pending_copies = current->pending_copies;
  for (const PendingCopy& c : pending_copies) {
    if (c.valid)
      std::memcpy(c.dst, c.src, 16);
    else
      std::memset(c.dst, 0, 16);
  }
  pending_copies.clear();
}

inline void check_no_pending_copies() {
  const std::vector<PendingCopy>& pending_copies = current->pending_copies;
  if (!pending_copies.empty()) {
    std::fprintf(stderr, "emulated CUDA: a thread ended with %zu asynchronous copies it never "
                 "waited for\n", pending_copies.size());
    std::abort();
  }
}
}  // namespace mmattn_emulation

// The warp matrix operations of <mma.h> (nvcuda::wmma), for the 16-bit types (their CUDA types
// are c10's here) and TF32 (precision::tf32: floats, rounded by __float_to_tf32 as on the GPU)
// with float accumulators. The API leaves which lane holds which element of a
// fragment unspecified, so here every lane holds the whole tile and computes the whole product;
// a store is written by lane 0 alone, so the other lanes see it only after a __syncwarp (as on
// the GPU, where each lane stores its own elements). Pointers and leading dimensions are
// checked as the GPU requires them (a 256-bit aligned pointer, ldm a multiple of 16 bytes).
using __nv_bfloat16 = c10::BFloat16;
using __half = c10::Half;
namespace nvcuda {
namespace wmma {
struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };
namespace precision {
struct tf32 {};
}  // namespace precision

// What a fragment of element type T holds and loads from: T, floats for TF32.
template <typename T>
using storage_t = std::conditional_t<std::is_same_v<T, precision::tf32>, float, T>;

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
  static constexpr int rows = std::is_same_v<Use, matrix_b> ? K : M;
  static constexpr int cols = std::is_same_v<Use, matrix_a> ? K : N;
  static constexpr int num_elements = rows * cols;
  storage_t<T> x[rows * cols];  // (row-major)
};

// A float rounded to TF32's 10 mantissa bits, to nearest with ties away from zero
// (cvt.rna.tf32.f32, as on the GPU); infinities and NaN unchanged.
inline float __float_to_tf32(float v) {
  if (!std::isfinite(v)) return v;
  uint32_t bits;
  std::memcpy(&bits, &v, 4);
  bits = (bits + 0x1000u) & 0xFFFFE000u;
  std::memcpy(&v, &bits, 4);
  return v;
}

inline void check_matrix(const void* p, unsigned ldm, size_t elem) {
  mmattn_emulation::check_aligned(p, 32);
  if ((ldm * elem) % 16 != 0) {
    std::fprintf(stderr, "emulated wmma: ldm %u is not a multiple of 16 bytes\n", ldm);
    std::abort();
  }
}

template <typename Use, int M, int N, int K, typename T, typename Layout>
inline void load_matrix_sync(fragment<Use, M, N, K, T, Layout>& f, const storage_t<T>* p,
                             unsigned ldm) {
  using F = fragment<Use, M, N, K, T, Layout>;
  check_matrix(p, ldm, sizeof(storage_t<T>));
  for (int r = 0; r < F::rows; ++r)
    for (int c = 0; c < F::cols; ++c)
      f.x[r * F::cols + c] =
          std::is_same_v<Layout, row_major> ? p[r * ldm + c] : p[c * ldm + r];
}

template <int M, int N, int K>
inline void fill_fragment(fragment<accumulator, M, N, K, float>& f, float value) {
  for (float& v : f.x) v = value;
}

template <int M, int N, int K, typename T, typename LA, typename LB>
inline void mma_sync(fragment<accumulator, M, N, K, float>& d,
                     const fragment<matrix_a, M, N, K, T, LA>& a,
                     const fragment<matrix_b, M, N, K, T, LB>& b,
                     const fragment<accumulator, M, N, K, float>& c) {
  for (int i = 0; i < M; ++i)
    for (int j = 0; j < N; ++j) {
      float sum = c.x[i * N + j];
      for (int k = 0; k < K; ++k)
        sum += static_cast<float>(a.x[i * K + k]) * static_cast<float>(b.x[k * N + j]);
      d.x[i * N + j] = sum;
    }
}

template <int M, int N, int K>
inline void store_matrix_sync(float* p, const fragment<accumulator, M, N, K, float>& f,
                              unsigned ldm, layout_t layout) {
  check_matrix(p, ldm, sizeof(float));
  if (threadIdx.x % 32 != 0) return;
  for (int r = 0; r < M; ++r)
    for (int c = 0; c < N; ++c)
      (layout == mem_row_major ? p[r * ldm + c] : p[c * ldm + r]) = f.x[r * N + c];
}
}  // namespace wmma
}  // namespace nvcuda

// atomicAdd: the old value, the sum stored (the threads run one at a time)
template <typename T>
inline T atomicAdd(T* address, T value) {
  const T old = *address;
  *address = old + value;
  return old;
}

namespace mmattn {
namespace launch {

struct DeviceGuard {
  explicit DeviceGuard(c10::Device) {}
};

enum class Attr { kMultiProcessors, kSharedMemoryOptin, kComputeMajor };

// a small device: few blocks per launch keep the emulation quick and still split reductions;
// a Hopper otherwise (compute capability 9.x, its shared memory)
inline int device_attribute(Attr attr) {
  return attr == Attr::kMultiProcessors      ? 2
         : attr == Attr::kSharedMemoryOptin ? static_cast<int>(mmattn_emulation::kSharedMemoryBytes)
                                            : 9;
}

// A kernel's dynamic shared memory limit, as on the GPU: 48 KiB, unless allow_shared_memory
// raised it (cudaFuncAttributeMaxDynamicSharedMemorySize, up to the device's opt-in limit).
// A launch above it fails there ("invalid argument"), and an occupancy query above it answers
// 0 blocks: both are errors here.
constexpr size_t kDefaultDynamicShared = 48 * 1024;

inline std::map<const void*, size_t>& raised_shared_limits() {
  static std::map<const void*, size_t> limits;
  return limits;
}

inline size_t shared_limit(const void* kernel) {
  const auto it = raised_shared_limits().find(kernel);
  return it == raised_shared_limits().end() ? kDefaultDynamicShared
                                            : std::max(kDefaultDynamicShared, it->second);
}

template <typename... KArgs>
void allow_shared_memory(void (*kernel)(KArgs...), size_t bytes) {
  TORCH_CHECK(bytes <= mmattn_emulation::kSharedMemoryBytes, "emulated cudaFuncSetAttribute: ",
              bytes, " bytes of dynamic shared memory, the device's opt-in limit is ",
              mmattn_emulation::kSharedMemoryBytes);
  size_t& limit = raised_shared_limits()[reinterpret_cast<const void*>(kernel)];
  limit = std::max(limit, bytes);
}

// 4 resident blocks per "SM": with 2 SMs, launches sized to one wave split small batches' work
template <typename... KArgs>
int resident_blocks(void (*kernel)(KArgs...), unsigned, size_t smem) {
  const size_t limit = shared_limit(reinterpret_cast<const void*>(kernel));
  TORCH_CHECK(smem <= limit, "emulated occupancy query: ", smem, " bytes of dynamic shared "
              "memory, above the kernel's limit of ", limit, " (48 KiB unless "
              "allow_shared_memory raised it): the GPU answers 0 blocks");
  return 4;
}

using mmattn_emulation::kMaxClusterBlocks;

// every cluster size up to kMaxClusterBlocks "fits" (launch_clusters runs it)
template <typename... KArgs>
int cluster_blocks(void (*)(KArgs...), int wanted, unsigned, size_t) {
  return std::max(1, std::min(wanted, static_cast<int>(kMaxClusterBlocks)));
}

// Runs `blocks` of a launch at once (consecutive clusters of `cluster` blocks; a cooperative
// launch's whole grid), each block with its own shared memory.
template <typename... KArgs, typename... Args>
void run_together(void (*kernel)(KArgs...), const std::vector<dim3>& blocks, unsigned cluster,
                  bool cooperative, unsigned threads, Args&... args) {
  namespace emu = mmattn_emulation;
  const unsigned count = static_cast<unsigned>(blocks.size()), warps = (threads + 31) / 32;
  TORCH_CHECK(count <= kMaxClusterBlocks, "emulated launch: ", count, " blocks at once, the "
              "emulation's shared memory holds ", kMaxClusterBlocks);
  std::vector<emu::Barrier> cluster_sync(count / cluster, emu::Barrier(cluster * threads));
  std::vector<emu::ClusterOrder> orders(count / cluster);
  for (emu::ClusterOrder& order : orders) order.others = (cluster - 1) * threads;
  emu::Barrier grid_sync(count * threads);
  std::vector<emu::Barrier> block_sync(count, emu::Barrier(threads));
  std::vector<std::vector<emu::Barrier>> warp_sync(count);
  std::vector<std::vector<emu::ShuffleSlot>> exchange(count,
                                                     std::vector<emu::ShuffleSlot>(64 * warps));
  for (unsigned b = 0; b < count; ++b)
    for (unsigned w = 0; w < warps; ++w) warp_sync[b].emplace_back(std::min(32u, threads - 32 * w));
  for (unsigned char* memory : emu::shared_memories)
    std::memset(memory, 0xFF, count * emu::kSharedMemoryBytes);
  const std::function<void()> body = [&] {
    emu::Block& block = emu::current->block;
    const bool last = emu::last_of_cluster();
    if (last) emu::wait_for_others(1);
    kernel(args...);
    emu::check_no_pending_copies();
    if (cluster > 1 && !last)  // (an exited thread has reached every later barrier)
      for (unsigned k = emu::current->cluster_barriers + 1; k <= emu::kMaxClusterBarriers + 1;
           ++k)
        emu::reach(k);
    // an exited thread no longer holds others up
    (*block.warps)[threadIdx.x / 32].arrive_and_drop();
    block.threads->arrive_and_drop();
    block.cluster->arrive_and_drop();
    if (block.grid) block.grid->arrive_and_drop();
  };
  const std::vector<emu::Fiber*> fibers = emu::fibers(count * threads, body);
  for (unsigned i = 0; i < count * threads; ++i) {
    const unsigned b = i / threads;
    fibers[i]->block_idx = blocks[b];
    fibers[i]->thread_idx = dim3(i % threads);
    fibers[i]->block = {&block_sync[b], &warp_sync[b], &exchange[b], &cluster_sync[b / cluster],
                        cooperative ? &grid_sync : nullptr, b, b % cluster, cluster,
                        &orders[b / cluster]};
  }
  emu::run(fibers, threads);
}

inline void check_launch(const void* kernel, dim3 grid, unsigned threads, size_t smem) {
  TORCH_CHECK(threads >= 1 && threads <= 1024, "emulated launch: ", threads, " threads");
  TORCH_CHECK(smem <= shared_limit(kernel), "emulated launch: ", smem, " bytes of dynamic "
              "shared memory, above the kernel's limit of ", shared_limit(kernel), " (48 KiB "
              "unless allow_shared_memory raised it)");
  TORCH_CHECK(grid.y <= 65535 && grid.z <= 65535, "emulated launch: a grid of ", grid.y,
              " x ", grid.z, " blocks in y and z, the device takes 65535 at most");
  TORCH_CHECK(smem <= mmattn_emulation::kSharedMemoryBytes, "emulated launch: ", smem,
              " bytes of shared memory, the device has ", mmattn_emulation::kSharedMemoryBytes);
  ++mmattn_emulation::launches;
  gridDim = grid;
  blockDim = dim3(threads);
}

template <typename... KArgs, typename... Args>
void launch_clusters(void (*kernel)(KArgs...), dim3 grid, unsigned cluster, unsigned threads,
                     size_t smem, Args&&... args) {
  TORCH_CHECK(cluster >= 1 && cluster <= kMaxClusterBlocks && grid.x % cluster == 0,
              "emulated launch: clusters of ", cluster, " blocks on a grid of ", grid.x,
              " in x (at most ", kMaxClusterBlocks, ", dividing the grid)");
  check_launch(reinterpret_cast<const void*>(kernel), grid, threads, smem);
  // the clusters in index order (x, then y, then z) in a kernel's odd launches, in reverse in
  // its even ones
  unsigned& launched = mmattn_emulation::launch_counts[reinterpret_cast<const void*>(kernel)];
  const bool forward = launched++ % 2 == 0;
  const size_t row = grid.x / cluster, count = row * grid.y * grid.z;
  for (size_t i = 0; i < count; ++i) {
    const size_t c = forward ? i : count - 1 - i;
    const unsigned x0 = static_cast<unsigned>(c % row * cluster);
    const unsigned y = static_cast<unsigned>(c / row % grid.y);
    const unsigned z = static_cast<unsigned>(c / row / grid.y);
    std::vector<dim3> blocks;
    for (unsigned b = 0; b < cluster; ++b) blocks.emplace_back(x0 + b, y, z);
    run_together(kernel, blocks, cluster, false, threads, args...);
  }
}

// a cooperative launch: every block of the grid at once (at most the emulated device's
// resident blocks), grid_sync() a barrier of all their threads
template <typename... KArgs, typename... Args>
void launch_cooperative(void (*kernel)(KArgs...), dim3 grid, unsigned threads, size_t smem,
                        Args&&... args) {
  check_launch(reinterpret_cast<const void*>(kernel), grid, threads, smem);
  std::vector<dim3> blocks;
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) blocks.emplace_back(x, y, z);
  const size_t resident = static_cast<size_t>(resident_blocks(kernel, threads, smem)) *
                          device_attribute(Attr::kMultiProcessors);
  TORCH_CHECK(blocks.size() <= resident, "emulated cooperative launch: ", blocks.size(),
              " blocks, more than the device holds at once (", resident, ")");
  run_together(kernel, blocks, 1, true, threads, args...);
}

template <typename... KArgs, typename... Args>
void launch(void (*kernel)(KArgs...), dim3 grid, unsigned threads, size_t smem,
            Args&&... args) {
  launch_clusters(kernel, grid, 1, threads, smem, std::forward<Args>(args)...);
}

inline void cluster_sync() {
  namespace emu = mmattn_emulation;
  const unsigned barrier = ++emu::current->cluster_barriers;
  if (barrier > emu::kMaxClusterBarriers) {
    std::fprintf(stderr, "emulated CUDA: more than %u cluster barriers in a kernel\n",
                 emu::kMaxClusterBarriers);
    std::abort();
  }
  const bool last = emu::last_of_cluster();
  if (!last && emu::current->block.cluster_blocks > 1) emu::reach(barrier);
  emu::current->block.cluster->arrive_and_wait();
  if (last) emu::wait_for_others(barrier + 1);
}

inline void grid_sync() {
  mmattn_emulation::Barrier* grid = mmattn_emulation::current->block.grid;
  if (grid == nullptr) mmattn_emulation::fail("grid_sync() in a launch that is not cooperative");
  grid->arrive_and_wait();
}

inline unsigned char* block_shared(unsigned char* memory) {
  return memory + mmattn_emulation::current->block.slot * mmattn_emulation::kSharedMemoryBytes;
}
#define MMATTN_BLOCK_SHARED(memory) ::mmattn::launch::block_shared(memory)

}  // namespace launch
}  // namespace mmattn

// Defines the dynamic shared memory of the kernels in namespace NS and registers it.
#define MMATTN_EMULATED_SHARED_MEMORY(NS)                                              \
  namespace NS {                                                                       \
  alignas(16) unsigned char                                                            \
      smem_raw[mmattn_emulation::kMaxClusterBlocks * mmattn_emulation::kSharedMemoryBytes]; \
  const bool smem_registered = mmattn_emulation::register_shared_memory(smem_raw);     \
  }
