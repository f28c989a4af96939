// The outlook-attention CUDA kernels and their host wrappers
// (mmattn/ops/csrc/outlook_kernels.cuh) compiled for the CPU emulation of emulated_cuda.h,
// registered as the CPU implementations of mmattn_emulated::outlook_fwd / outlook_bwd.
#include "emulated_cuda.h"

#include <torch/library.h>

#include "outlook_kernels.cuh"

MMATTN_EMULATED_SHARED_MEMORY(mmattn::outlook_detail)

// whether the gathers of v (into a map of its own shape) run on the tensor-core kernel
bool outlook_gather_tensor_cores(const at::Tensor& v, const at::Tensor& attn, int64_t K,
                                 int64_t p, int64_t s) {
  const mmattn::OutlookGeom g = mmattn::outlook_check("outlook_gather_tensor_cores", nullptr, v,
                                                      attn, K, p, s);
  return mmattn::outlook_detail::gather_on_tensor_cores(g, static_cast<int>(v.size(3) / g.N),
                                                        v.data_ptr(), v.data_ptr(),
                                                        v.element_size());
}

TORCH_LIBRARY_IMPL(mmattn_emulated, CPU, m) {
  mmattn::register_outlook_cuda_ops(m);
  m.impl("outlook_gather_tensor_cores", &outlook_gather_tensor_cores);
}
