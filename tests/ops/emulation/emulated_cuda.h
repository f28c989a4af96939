// CUDA's execution model on the CPU, so that mmattn's kernel sources (mmattn/ops/csrc/*.cuh) can
// be compiled by the host compiler and run in the tests on a machine without a GPU.
//
// A launch runs the grid's blocks one after another; a block runs each of its CUDA threads on an
// OS thread of a pool (threads are started once and reused: starting 256 threads took 8.7 ms a
// block on 2 cores, more than the work of most blocks), with __syncthreads() a barrier of the
// block and the warp shuffles an exchange through a buffer between two barriers of the warp.
// Dynamic shared memory is one buffer (the blocks do not overlap in time), filled with 0xFF bytes
// (NaN for floating point) before each block so that a read of shared memory nobody wrote shows
// up in the results. Threads really run
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

inline dim3 gridDim, blockDim, blockIdx;  // shared by the threads of the running block
inline thread_local dim3 threadIdx;

using std::max;
using std::min;

namespace mmattn_emulation {

struct Block {
  std::barrier<>* threads = nullptr;
  std::vector<std::unique_ptr<std::barrier<>>>* warps = nullptr;
  std::vector<double>* exchange = nullptr;
};
inline Block block;
constexpr size_t kSharedMemoryBytes = 227 * 1024;  // an H100's opt-in limit per block
inline std::vector<unsigned char*> shared_memories;  // one per kernel family
inline int64_t launches = 0;                         // kernel launches so far (for the tests)

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

template <typename... KArgs, typename... Args>
void launch(void (*kernel)(KArgs...), dim3 grid, unsigned threads, size_t smem,
            Args&&... args) {
  TORCH_CHECK(threads >= 1 && threads <= 1024, "emulated launch: ", threads, " threads");
  TORCH_CHECK(grid.y <= 65535 && grid.z <= 65535, "emulated launch: a grid of ", grid.y,
              " x ", grid.z, " blocks in y and z, the device takes 65535 at most");
  TORCH_CHECK(smem <= mmattn_emulation::kSharedMemoryBytes, "emulated launch: ", smem,
              " bytes of shared memory, the device has ", mmattn_emulation::kSharedMemoryBytes);
  ++mmattn_emulation::launches;
  gridDim = grid;
  blockDim = dim3(threads);
  const unsigned warps = (threads + 31) / 32;
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) {
        blockIdx = dim3(x, y, z);
        std::barrier<> block_sync(threads);
        std::vector<std::unique_ptr<std::barrier<>>> warp_sync;
        for (unsigned w = 0; w < warps; ++w)
          warp_sync.push_back(std::make_unique<std::barrier<>>(std::min(32u, threads - 32 * w)));
        std::vector<double> exchange(32 * warps);
        mmattn_emulation::block = {&block_sync, &warp_sync, &exchange};
        for (unsigned char* memory : mmattn_emulation::shared_memories)
          std::memset(memory, 0xFF, mmattn_emulation::kSharedMemoryBytes);
        mmattn_emulation::Pool::get().run(threads, [&](unsigned t) {
          threadIdx = dim3(t);
          kernel(args...);
          mmattn_emulation::check_no_pending_copies();
          warp_sync[t / 32]->arrive_and_drop();  // an exited thread no longer holds others up
          block_sync.arrive_and_drop();
        });
      }
}

}  // namespace launch
}  // namespace mmattn

// Defines the dynamic shared memory of the kernels in namespace NS and registers it.
#define MMATTN_EMULATED_SHARED_MEMORY(NS)                                              \
  namespace NS {                                                                       \
  alignas(16) unsigned char smem_raw[mmattn_emulation::kSharedMemoryBytes];            \
  const bool smem_registered = mmattn_emulation::register_shared_memory(smem_raw);     \
  }
