// How mmattn's CUDA kernels are launched and how the host code queries the device, in one
// place: this header for the real GPU; tests/ops/emulation/emulated_cuda.h provides the same
// names to run the very same kernel sources on the CPU (one OS thread per CUDA thread), which is
// how the kernels' logic is tested on machines without a GPU.
#pragma once

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>  // not ATen/cuda/CUDAContext.h: it needs cusparse.h
#include <cuda_runtime.h>

#include <utility>

namespace mmattn {
namespace launch {

using DeviceGuard = c10::cuda::CUDAGuard;

enum class Attr { kMultiProcessors, kSharedMemoryOptin };

// A property of the current device (the CUDA runtime directly: ATen/cuda/CUDAContext.h would
// pull in the cuBLAS/cuSPARSE headers, which a minimal toolkit lacks).
inline int device_attribute(Attr attr) {
  int device = 0, value = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(
      &value,
      attr == Attr::kMultiProcessors ? cudaDevAttrMultiProcessorCount
                                     : cudaDevAttrMaxSharedMemoryPerBlockOptin,
      device));
  return value;
}

// Lets `kernel` use `bytes` of dynamic shared memory (needed above 48 KiB).
template <typename... KArgs>
void allow_shared_memory(void (*kernel)(KArgs...), size_t bytes) {
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                      static_cast<int>(bytes)));
}

// How many blocks of `kernel` (`threads` threads, `smem` bytes of dynamic shared memory) one SM
// holds at once (registers, shared memory and thread limits together); at least 1.
template <typename... KArgs>
int resident_blocks(void (*kernel)(KArgs...), unsigned threads, size_t smem) {
  int blocks = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, kernel,
                                                               static_cast<int>(threads), smem));
  return blocks > 0 ? blocks : 1;
}

// kernel<<<grid, threads, smem, current stream>>>(args...), checked.
template <typename... KArgs, typename... Args>
void launch(void (*kernel)(KArgs...), dim3 grid, unsigned threads, size_t smem, Args&&... args) {
  kernel<<<grid, threads, smem, c10::cuda::getCurrentCUDAStream()>>>(std::forward<Args>(args)...);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace launch
}  // namespace mmattn
