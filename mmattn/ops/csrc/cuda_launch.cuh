// How mmattn's CUDA kernels are launched and how the host code queries the device, in one
// place: this header for the real GPU; tests/ops/emulation/emulated_cuda.h provides the same
// names to run the very same kernel sources on the CPU (each CUDA thread a fiber), which is how
// the kernels' logic is tested on machines without a GPU.
#pragma once

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>  // not ATen/cuda/CUDAContext.h: it needs cusparse.h
#include <cooperative_groups.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <map>
#include <mutex>
#include <tuple>
#include <utility>

namespace mmattn {
namespace launch {

using DeviceGuard = c10::cuda::CUDAGuard;

enum class Attr { kMultiProcessors, kSharedMemoryOptin, kComputeMajor };

// What the host code asks the runtime before a launch (device attributes, a kernel's
// occupancy, whether its shared-memory limit was raised), asked once per device and kernel and
// remembered: a block's forward and backward launch up to 8 kernels, and each of these runtime
// calls costs microseconds of host time on every call otherwise.
class RuntimeCache {
 public:
  static RuntimeCache& get() {
    static RuntimeCache cache;
    return cache;
  }
  // value of key, computed by `compute` the first time it is asked for
  template <typename F>
  int lookup(const std::tuple<int, const void*, int64_t, int64_t>& key, F&& compute) {
    {
      const std::lock_guard<std::mutex> lock(mutex_);
      const auto it = values_.find(key);
      if (it != values_.end()) return it->second;
    }
    const int value = compute();  // (outside the lock: a CUDA error throws from here)
    const std::lock_guard<std::mutex> lock(mutex_);
    values_[key] = value;
    return value;
  }
  // raise(key, value, apply): apply() unless key's remembered value is already value or more,
  // then remember the larger
  template <typename F>
  void raise(const std::tuple<int, const void*, int64_t, int64_t>& key, int value, F&& apply) {
    const std::lock_guard<std::mutex> lock(mutex_);
    const auto it = values_.find(key);
    if (it != values_.end() && it->second >= value) return;
    apply();
    values_[key] = value;
  }

 private:
  std::mutex mutex_;
  std::map<std::tuple<int, const void*, int64_t, int64_t>, int> values_;
};

inline int current_device() {
  int device = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  return device;
}

// A property of the current device (the CUDA runtime directly: ATen/cuda/CUDAContext.h would
// pull in the cuBLAS/cuSPARSE headers, which a minimal toolkit lacks).
inline int device_attribute(Attr attr) {
  const int device = current_device();
  return RuntimeCache::get().lookup(
      std::make_tuple(device, static_cast<const void*>(nullptr), static_cast<int64_t>(attr),
                      int64_t{-1}),
      [&] {
        int value = 0;
        C10_CUDA_CHECK(cudaDeviceGetAttribute(
            &value,
            attr == Attr::kMultiProcessors    ? cudaDevAttrMultiProcessorCount
            : attr == Attr::kSharedMemoryOptin ? cudaDevAttrMaxSharedMemoryPerBlockOptin
                                               : cudaDevAttrComputeCapabilityMajor,
            device));
        return value;
      });
}

// Lets `kernel` use `bytes` of dynamic shared memory (needed above 48 KiB).
template <typename... KArgs>
void allow_shared_memory(void (*kernel)(KArgs...), size_t bytes) {
  // (only ever raised: a launch that needs less than an earlier one's limit is served by it)
  RuntimeCache::get().raise(
      std::make_tuple(current_device(), reinterpret_cast<const void*>(kernel), int64_t{-2},
                      int64_t{-1}),
      static_cast<int>(bytes), [&] {
        C10_CUDA_CHECK(cudaFuncSetAttribute(
            kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
      });
}

// How many blocks of `kernel` (`threads` threads, `smem` bytes of dynamic shared memory) one SM
// holds at once (registers, shared memory and thread limits together); at least 1.
template <typename... KArgs>
int resident_blocks(void (*kernel)(KArgs...), unsigned threads, size_t smem) {
  return RuntimeCache::get().lookup(
      std::make_tuple(current_device(), reinterpret_cast<const void*>(kernel),
                      static_cast<int64_t>(threads), static_cast<int64_t>(smem)),
      [&] {
        int blocks = 0;
        C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(
            &blocks, kernel, static_cast<int>(threads), smem));
        return blocks > 0 ? blocks : 1;
      });
}

// kernel<<<grid, threads, smem, current stream>>>(args...), checked.
template <typename... KArgs, typename... Args>
void launch(void (*kernel)(KArgs...), dim3 grid, unsigned threads, size_t smem, Args&&... args) {
  kernel<<<grid, threads, smem, c10::cuda::getCurrentCUDAStream()>>>(std::forward<Args>(args)...);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Thread-block clusters (compute capability 9.0): the blocks of a cluster run at the same time on
// one GPU processing cluster and can wait for each other (cluster_sync).
constexpr int kMaxClusterBlocks = 8;  // the portable cluster size

// A launch of `grid` blocks on the current stream with one attribute (`attr`, its storage,
// filled in by the caller).
inline cudaLaunchConfig_t launch_config(dim3 grid, unsigned threads, size_t smem,
                                        cudaLaunchAttribute* attr) {
  cudaLaunchConfig_t config = {};
  config.gridDim = grid;
  config.blockDim = dim3(threads);
  config.dynamicSmemBytes = smem;
  config.stream = c10::cuda::getCurrentCUDAStream();
  config.attrs = attr;
  config.numAttrs = 1;
  return config;
}

// ... in clusters of `cluster` blocks along x
inline cudaLaunchConfig_t cluster_config(dim3 grid, unsigned cluster, unsigned threads,
                                         size_t smem, cudaLaunchAttribute* attr) {
  attr->id = cudaLaunchAttributeClusterDimension;
  attr->val.clusterDim.x = cluster;
  attr->val.clusterDim.y = 1;
  attr->val.clusterDim.z = 1;
  return launch_config(grid, threads, smem, attr);
}

// The largest cluster size up to `wanted` (at most kMaxClusterBlocks) in which `kernel`'s
// blocks (`threads`, `smem` bytes of dynamic shared memory) can be resident together on this
// device: 1 below compute capability 9.0 (no clusters), where none of 2 or more fits, or where
// the runtime cannot tell.
template <typename... KArgs>
int cluster_blocks(void (*kernel)(KArgs...), int wanted, unsigned threads, size_t smem) {
  wanted = wanted < kMaxClusterBlocks ? wanted : kMaxClusterBlocks;
  if (wanted <= 1 || device_attribute(Attr::kComputeMajor) < 9) return 1;
  return RuntimeCache::get().lookup(
      std::make_tuple(current_device(), reinterpret_cast<const void*>(kernel),
                      int64_t{-3} - wanted, static_cast<int64_t>(threads) << 32 | smem),
      [&] {
        for (int size = wanted; size > 1; --size) {
          cudaLaunchAttribute attr;
          const cudaLaunchConfig_t config = cluster_config(dim3(size), size, threads, smem, &attr);
          int clusters = 0;
          if (cudaOccupancyMaxActiveClusters(&clusters, kernel, &config) != cudaSuccess) {
            (void)cudaGetLastError();  // (a device that cannot say: no clusters)
            return 1;
          }
          if (clusters > 0) return size;
        }
        return 1;
      });
}

// `kernel` on `grid` blocks in clusters of `cluster` consecutive blocks along x (grid.x a
// multiple of it; a plain launch for 1), on the current stream, checked.
template <typename... KArgs, typename... Args>
void launch_clusters(void (*kernel)(KArgs...), dim3 grid, unsigned cluster, unsigned threads,
                     size_t smem, Args&&... args) {
  if (cluster <= 1) return launch(kernel, grid, threads, smem, std::forward<Args>(args)...);
  cudaLaunchAttribute attr;
  const cudaLaunchConfig_t config = cluster_config(grid, cluster, threads, smem, &attr);
  C10_CUDA_CHECK(cudaLaunchKernelEx(&config, kernel, std::forward<Args>(args)...));
}

// A barrier of the cluster's threads (all of them call it) that orders their memory accesses,
// global and shared (release at arrival, acquire at the wait, at cluster scope); a block's
// __syncthreads where there are no clusters.
__device__ __forceinline__ void cluster_sync() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  cooperative_groups::this_cluster().sync();
#else
  __syncthreads();
#endif
}

// `kernel` on `grid` blocks that are all resident at once (a cooperative launch: the blocks
// may wait for each other, grid_sync), on the current stream, checked. The caller keeps the
// grid within what the device holds at once (resident_blocks x multiprocessors); the runtime
// refuses a larger one (cudaErrorCooperativeLaunchTooLarge).
template <typename... KArgs, typename... Args>
void launch_cooperative(void (*kernel)(KArgs...), dim3 grid, unsigned threads, size_t smem,
                        Args&&... args) {
  cudaLaunchAttribute attr;
  attr.id = cudaLaunchAttributeCooperative;
  attr.val.cooperative = 1;
  const cudaLaunchConfig_t config = launch_config(grid, threads, smem, &attr);
  C10_CUDA_CHECK(cudaLaunchKernelEx(&config, kernel, std::forward<Args>(args)...));
}

// A barrier of all the threads of a cooperative launch's grid that orders their memory
// accesses (cooperative_groups' grid sync: a fence and an arrival counter in global memory).
__device__ __forceinline__ void grid_sync() { cooperative_groups::this_grid().sync(); }

// The dynamic shared memory of the running block: `memory` itself here; the CPU emulation,
// which runs a cluster's or a cooperative launch's blocks at once, gives each its own. (A macro:
// through an inline identity function, ptxas spilled a float64 pass kernel on sm_90, where the
// array itself left it none.)
#define MMATTN_BLOCK_SHARED(memory) (memory)

}  // namespace launch
}  // namespace mmattn
