// CUDA's execution model on the CPU, so that mmattn's kernel sources (mmattn/ops/csrc/*.cuh) can
// be compiled by the host compiler and run in the tests on a machine without a GPU.
//
// A launch runs the grid's blocks one after another (a thread-block cluster's blocks at the same
// time, cluster_sync() a barrier of all their threads); a block runs each of its CUDA threads on
// an OS thread of a pool (threads are started once and reused: starting 256 threads took 8.7 ms
// a block on 2 cores, more than the work of most blocks), with __syncthreads() a barrier of the
// block and the warp shuffles an exchange through a buffer between two barriers of the warp.
// Dynamic shared memory is one buffer per block that runs at once (launch::block_shared picks the
// block's: a kernel launched in clusters must take its shared memory through it), filled with
// 0xFF bytes (NaN for floating point) before each block so that a read of shared memory nobody
// wrote shows up in the results. Threads really run
// concurrently, so a missing __syncthreads can show as a wrong (or flaky) result; what cannot be
// seen here: the GPU's memory model, performance, and errors that only the device's limits
// produce. This provides the interface of mmattn/ops/csrc/cuda_launch.cuh.
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

#include <algorithm>
#include <atomic>
#include <array>
#include <barrier>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <semaphore>
#include <thread>
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
inline thread_local dim3 blockIdx, threadIdx;

using std::max;
using std::min;

namespace mmattn_emulation {

struct ClusterOrder;

struct Block {
  std::barrier<>* threads = nullptr;
  std::vector<std::unique_ptr<std::barrier<>>>* warps = nullptr;
  std::vector<double>* exchange = nullptr;
  std::barrier<>* cluster = nullptr;  // all threads of the block's cluster
  unsigned slot = 0;                  // the block's place in its cluster (its shared memory)
  unsigned cluster_blocks = 1;
  ClusterOrder* order = nullptr;
};
inline thread_local Block block;  // the calling thread's block
constexpr size_t kSharedMemoryBytes = 227 * 1024;  // an H100's opt-in limit per block
constexpr unsigned kMaxClusterBlocks = 8;          // the portable cluster size
// one per kernel family, kMaxClusterBlocks blocks' worth
inline std::vector<unsigned char*> shared_memories;
inline int64_t launches = 0;                         // kernel launches so far (for the tests)

// The last block of a cluster runs each step between cluster barriers only once the other
// blocks have run theirs (reached the next barrier, or exited), so that a step missing a cluster
// barrier shows: the others write what the last block has yet to read, or read what it has yet
// to write. Per barrier, the count of the other blocks' threads that have reached it.
constexpr unsigned kMaxClusterBarriers = 64;  // a kernel's cluster barriers, at most

struct ClusterOrder {
  unsigned others = 0;  // the other blocks' threads
  std::array<std::atomic<unsigned>, kMaxClusterBarriers + 2> reached{};
};
inline thread_local unsigned cluster_barriers = 0;  // the calling thread's so far

inline bool last_of_cluster() {
  return block.cluster_blocks > 1 && block.slot + 1 == block.cluster_blocks;
}

inline void reach(unsigned barrier) {
  std::atomic<unsigned>& r = block.order->reached[barrier];
  if (r.fetch_add(1) + 1 == block.order->others) r.notify_all();
}

// (the last block's threads) until the other blocks' threads have reached `barrier`
inline void wait_for_others(unsigned barrier) {
  std::atomic<unsigned>& r = block.order->reached[barrier];
  for (unsigned v = r.load(); v < block.order->others; v = r.load()) r.wait(v);
}

inline bool register_shared_memory(unsigned char* memory) {
  shared_memories.push_back(memory);
  return true;
}

// The OS threads that run a block's CUDA threads, started on first need and kept (never
// destroyed: the process's exit ends them). run(n, body) calls body(t) on worker t for t < n,
// all concurrently, and returns when every call has returned; one run at a time.
class Pool {
 public:
  static Pool& get() {
    static Pool* pool = new Pool;
    return *pool;
  }

  void run(unsigned count, const std::function<void(unsigned)>& body) {
    while (workers_.size() < count) {
      workers_.push_back(std::make_unique<Worker>());
      Worker* w = workers_.back().get();
      const unsigned id = static_cast<unsigned>(workers_.size() - 1);
      std::thread([this, w, id] {
        for (;;) {
          w->start.acquire();
          (*body_)(id);
          if (pending_.fetch_sub(1, std::memory_order_acq_rel) == 1) done_.release();
        }
      }).detach();
    }
    body_ = &body;
    pending_.store(static_cast<int>(count), std::memory_order_release);
    for (unsigned t = 0; t < count; ++t) workers_[t]->start.release();
    done_.acquire();
  }

 private:
  struct Worker {
    std::binary_semaphore start{0};
  };
  std::vector<std::unique_ptr<Worker>> workers_;
  const std::function<void(unsigned)>* body_ = nullptr;
  std::atomic<int> pending_{0};
  std::binary_semaphore done_{0};
};

}  // namespace mmattn_emulation

inline void __syncthreads() { mmattn_emulation::block.threads->arrive_and_wait(); }

namespace mmattn_emulation {
// The warp shuffles: every lane of the warp posts its value, then takes lane `source`'s, between
// two barriers of the warp.
template <typename T>
inline T shuffle_from(T value, unsigned source) {
  const unsigned warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  double* slots = block.exchange->data() + warp * 32;
  std::barrier<>& sync = *(*block.warps)[warp];
  slots[lane] = static_cast<double>(value);
  sync.arrive_and_wait();
  const T other = static_cast<T>(slots[source % 32]);
  sync.arrive_and_wait();
  return other;
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
  (*mmattn_emulation::block.warps)[threadIdx.x / 32]->arrive_and_wait();
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

namespace mmattn_emulation {
inline std::mutex atomics;
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
struct PendingCopy {
  void* dst;
  const void* src;
  bool valid;
};
inline thread_local std::vector<PendingCopy> pending_copies;

inline void async_copy_16(void* dst, const void* src, bool valid) {
  std::memset(dst, 0xFF, 16);
  pending_copies.push_back({dst, src, valid});
}

inline void wait_async_copies() {
  for (const PendingCopy& c : pending_copies) {
    if (c.valid)
      std::memcpy(c.dst, c.src, 16);
    else
      std::memset(c.dst, 0, 16);
  }
  pending_copies.clear();
}

inline void check_no_pending_copies() {
  if (!pending_copies.empty()) {
    std::fprintf(stderr, "emulated CUDA: a thread ended with %zu asynchronous copies it never "
                 "waited for\n", pending_copies.size());
    std::abort();
  }
}
}  // namespace mmattn_emulation

// The warp matrix operations of <mma.h> (nvcuda::wmma), for the 16-bit types (their CUDA types
// are c10's here) with float accumulators. The API leaves which lane holds which element of a
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

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
  static constexpr int rows = std::is_same_v<Use, matrix_b> ? K : M;
  static constexpr int cols = std::is_same_v<Use, matrix_a> ? K : N;
  static constexpr int num_elements = rows * cols;
  T x[rows * cols];  // (row-major)
};

inline void check_matrix(const void* p, unsigned ldm, size_t elem) {
  mmattn_emulation::check_aligned(p, 32);
  if ((ldm * elem) % 16 != 0) {
    std::fprintf(stderr, "emulated wmma: ldm %u is not a multiple of 16 bytes\n", ldm);
    std::abort();
  }
}

template <typename Use, int M, int N, int K, typename T, typename Layout>
inline void load_matrix_sync(fragment<Use, M, N, K, T, Layout>& f, const T* p, unsigned ldm) {
  using F = fragment<Use, M, N, K, T, Layout>;
  check_matrix(p, ldm, sizeof(T));
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

// atomicAdd: the old value, the sum stored (one lock for every address: the threads of a block
// run concurrently)
template <typename T>
inline T atomicAdd(T* address, T value) {
  const std::lock_guard<std::mutex> lock(mmattn_emulation::atomics);
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

template <typename... KArgs>
void allow_shared_memory(void (*)(KArgs...), size_t) {}

// 4 resident blocks per "SM": with 2 SMs, launches sized to one wave split small batches' work
template <typename... KArgs>
int resident_blocks(void (*)(KArgs...), unsigned, size_t) {
  return 4;
}

using mmattn_emulation::kMaxClusterBlocks;

// every cluster size up to kMaxClusterBlocks "fits" (launch_clusters runs it)
template <typename... KArgs>
int cluster_blocks(void (*)(KArgs...), int wanted, unsigned, size_t) {
  return std::max(1, std::min(wanted, static_cast<int>(kMaxClusterBlocks)));
}

template <typename... KArgs, typename... Args>
void launch_clusters(void (*kernel)(KArgs...), dim3 grid, unsigned cluster, unsigned threads,
                     size_t smem, Args&&... args) {
  TORCH_CHECK(threads >= 1 && threads <= 1024, "emulated launch: ", threads, " threads");
  TORCH_CHECK(grid.y <= 65535 && grid.z <= 65535, "emulated launch: a grid of ", grid.y,
              " x ", grid.z, " blocks in y and z, the device takes 65535 at most");
  TORCH_CHECK(smem <= mmattn_emulation::kSharedMemoryBytes, "emulated launch: ", smem,
              " bytes of shared memory, the device has ", mmattn_emulation::kSharedMemoryBytes);
  TORCH_CHECK(cluster >= 1 && cluster <= kMaxClusterBlocks && grid.x % cluster == 0,
              "emulated launch: clusters of ", cluster, " blocks on a grid of ", grid.x,
              " in x (at most ", kMaxClusterBlocks, ", dividing the grid)");
  ++mmattn_emulation::launches;
  gridDim = grid;
  blockDim = dim3(threads);
  const unsigned warps = (threads + 31) / 32;
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x0 = 0; x0 < grid.x; x0 += cluster) {
        std::barrier<> cluster_sync(cluster * threads);
        mmattn_emulation::ClusterOrder order;
        order.others = (cluster - 1) * threads;
        std::vector<std::unique_ptr<std::barrier<>>> block_sync;
        std::vector<std::vector<std::unique_ptr<std::barrier<>>>> warp_sync(cluster);
        std::vector<std::vector<double>> exchange(cluster, std::vector<double>(32 * warps));
        for (unsigned b = 0; b < cluster; ++b) {
          block_sync.push_back(std::make_unique<std::barrier<>>(threads));
          for (unsigned w = 0; w < warps; ++w)
            warp_sync[b].push_back(
                std::make_unique<std::barrier<>>(std::min(32u, threads - 32 * w)));
        }
        for (unsigned char* memory : mmattn_emulation::shared_memories)
          std::memset(memory, 0xFF, cluster * mmattn_emulation::kSharedMemoryBytes);
        mmattn_emulation::Pool::get().run(cluster * threads, [&](unsigned t) {
          const unsigned b = t / threads, local = t % threads;
          blockIdx = dim3(x0 + b, y, z);
          threadIdx = dim3(local);
          mmattn_emulation::block = {block_sync[b].get(), &warp_sync[b], &exchange[b],
                                     &cluster_sync, b, cluster, &order};
          mmattn_emulation::cluster_barriers = 0;
          const bool last = mmattn_emulation::last_of_cluster();
          if (last) mmattn_emulation::wait_for_others(1);
          kernel(args...);
          mmattn_emulation::check_no_pending_copies();
          if (cluster > 1 && !last)  // (an exited thread has reached every later barrier)
            for (unsigned k = mmattn_emulation::cluster_barriers + 1;
                 k <= mmattn_emulation::kMaxClusterBarriers + 1; ++k)
              mmattn_emulation::reach(k);
          // an exited thread no longer holds others up
          warp_sync[b][local / 32]->arrive_and_drop();
          block_sync[b]->arrive_and_drop();
          cluster_sync.arrive_and_drop();
        });
      }
}

template <typename... KArgs, typename... Args>
void launch(void (*kernel)(KArgs...), dim3 grid, unsigned threads, size_t smem,
            Args&&... args) {
  launch_clusters(kernel, grid, 1, threads, smem, std::forward<Args>(args)...);
}

inline void cluster_sync() {
  namespace emu = mmattn_emulation;
  const unsigned barrier = ++emu::cluster_barriers;
  if (barrier > emu::kMaxClusterBarriers) {
    std::fprintf(stderr, "emulated CUDA: more than %u cluster barriers in a kernel\n",
                 emu::kMaxClusterBarriers);
    std::abort();
  }
  const bool last = emu::last_of_cluster();
  if (!last && emu::block.cluster_blocks > 1) emu::reach(barrier);
  emu::block.cluster->arrive_and_wait();
  if (last) emu::wait_for_others(barrier + 1);
}

inline unsigned char* block_shared(unsigned char* memory) {
  return memory + mmattn_emulation::block.slot * mmattn_emulation::kSharedMemoryBytes;
}

}  // namespace launch
}  // namespace mmattn

// Defines the dynamic shared memory of the kernels in namespace NS and registers it.
#define MMATTN_EMULATED_SHARED_MEMORY(NS)                                              \
  namespace NS {                                                                       \
  alignas(16) unsigned char                                                            \
      smem_raw[mmattn_emulation::kMaxClusterBlocks * mmattn_emulation::kSharedMemoryBytes]; \
  const bool smem_registered = mmattn_emulation::register_shared_memory(smem_raw);     \
  }
