// The column-sum kernels and their host code (mmattn/ops/csrc/column_sums.cuh) compiled for the
// CPU emulation of emulated_cuda.h, registered as the CPU implementations of
// mmattn_emulated::bias_grad / layer_norm_param_grads.
#include "emulated_cuda.h"

#include <torch/library.h>

#include "column_sums.cuh"

MMATTN_EMULATED_SHARED_MEMORY(mmattn::colsum)

TORCH_LIBRARY_IMPL(mmattn_emulated, CPU, m) {
  m.impl("bias_grad", &mmattn::bias_grad_cuda);
  m.impl("layer_norm_param_grads", &mmattn::layer_norm_param_grads_cuda);
}
