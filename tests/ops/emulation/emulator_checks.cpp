// Kernels that check the emulation itself (emulated_cuda.h): that a missing __syncthreads shows
// in the results, in either order of the threads, that a dependence between a launch's blocks
// shows in either order of the blocks, that a shuffle from a lane that is not there gives junk,
// and that threads waiting at barriers not all of them reach stop the launch with an error.
// Registered as mmattn_emulated::emulated_* (the test defines their schemas).
#include "emulated_cuda.h"

#include <torch/library.h>

namespace emulator_checks {

extern __shared__ __align__(16) unsigned char smem_raw[];

// Each round, every thread writes round * blockDim.x + its index to shared memory and reads the
// previous thread's (thread 0 its own) into out[round][thread]; a barrier between the write and
// the read where `barrier`, one at the end of every round.
__global__ void previous_thread_kernel(int64_t* out, int rounds, bool barrier) {
  auto* slots = reinterpret_cast<int64_t*>(smem_raw);
  const unsigned t = threadIdx.x;
  for (int r = 0; r < rounds; ++r) {
    slots[t] = r * static_cast<int64_t>(blockDim.x) + t;
    if (barrier) __syncthreads();
    out[r * blockDim.x + t] = slots[t == 0 ? 0 : t - 1];
    __syncthreads();
  }
}

// Block b (x + gridDim.x (y + gridDim.y z)) writes b to out[b][0], then reads the previous
// block's out[b - 1][0] (block 0 its own) into out[b][1]: a dependence between the blocks of a
// launch, which nothing orders on the GPU.
__global__ void previous_block_kernel(int64_t* out) {
  const int64_t b =
      blockIdx.x + static_cast<int64_t>(gridDim.x) * (blockIdx.y + gridDim.y * blockIdx.z);
  if (threadIdx.x == 0) {
    out[2 * b] = b;
    out[2 * b + 1] = out[2 * (b == 0 ? 0 : b - 1)];
  }
}

// Threads at or past `live` return; the others sum their indices over their warp by xor
// shuffles into out[thread]: a shuffle from a lane that has exited, or that the block does not
// have (a partial last warp), is undefined on the GPU.
__global__ void warp_sum_kernel(float* out, int live) {
  if (static_cast<int>(threadIdx.x) >= live) return;
  float v = static_cast<float>(threadIdx.x);
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  out[threadIdx.x] = v;
}

// The odd threads wait at the block's barrier, the even ones at their warp's.
__global__ void divergent_barriers_kernel() {
  if (threadIdx.x % 2)
    __syncthreads();
  else
    __syncwarp();
}

}  // namespace emulator_checks

MMATTN_EMULATED_SHARED_MEMORY(emulator_checks)

at::Tensor emulated_previous_thread(int64_t threads, int64_t rounds, bool barrier) {
  at::Tensor out = at::empty({rounds, threads}, at::kLong);
  mmattn::launch::launch(emulator_checks::previous_thread_kernel, dim3(1),
                         static_cast<unsigned>(threads), threads * sizeof(int64_t),
                         out.data_ptr<int64_t>(), static_cast<int>(rounds), barrier);
  return out;
}

at::Tensor emulated_previous_block(int64_t x, int64_t y, int64_t z, int64_t cluster) {
  at::Tensor out = at::full({x * y * z, 2}, -1, at::kLong);
  mmattn::launch::launch_clusters(
      emulator_checks::previous_block_kernel,
      dim3(static_cast<unsigned>(x), static_cast<unsigned>(y), static_cast<unsigned>(z)),
      static_cast<unsigned>(cluster), 32, 0, out.data_ptr<int64_t>());
  return out;
}

at::Tensor emulated_warp_sum(int64_t threads, int64_t live) {
  at::Tensor out = at::full({threads}, -1, at::kFloat);
  mmattn::launch::launch(emulator_checks::warp_sum_kernel, dim3(1),
                         static_cast<unsigned>(threads), 0, out.data_ptr<float>(),
                         static_cast<int>(live));
  return out;
}

void emulated_divergent_barriers(int64_t threads) {
  mmattn::launch::launch(emulator_checks::divergent_barriers_kernel, dim3(1),
                         static_cast<unsigned>(threads), 0);
}

// no tensor argument to dispatch on: one kernel for every key
TORCH_LIBRARY_IMPL(mmattn_emulated, CompositeImplicitAutograd, m) {
  m.impl("emulated_previous_thread", &emulated_previous_thread);
  m.impl("emulated_divergent_barriers", &emulated_divergent_barriers);
  m.impl("emulated_previous_block", &emulated_previous_block);
  m.impl("emulated_warp_sum", &emulated_warp_sum);
}
