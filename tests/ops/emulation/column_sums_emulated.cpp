// The column-sum kernels and their host code (mmattn/ops/csrc/column_sums.cuh) compiled for the
// CPU emulation of emulated_cuda.h, registered as the CPU implementations of
// mmattn_emulated::bias_grad / layer_norm_param_grads.
#include "emulated_cuda.h"

#include <torch/library.h>

#include "column_sums.cuh"

MMATTN_EMULATED_SHARED_MEMORY(mmattn::colsum)

TORCH_LIBRARY_IMPL(mmattn_emulated, CPU, m) {
  mmattn::register_column_sums_cuda_ops(m);
}
