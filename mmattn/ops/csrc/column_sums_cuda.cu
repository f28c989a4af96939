// The parameters' gradients of mmattn::linear and mmattn::layer_norm on CUDA: sums over the rows
// of a gradient (column_sums.cuh, launched through cuda_launch.cuh).
#include <torch/library.h>

#include "cuda_launch.cuh"
#include "column_sums.cuh"

TORCH_LIBRARY_IMPL(mmattn, CUDA, m) {
  m.impl("bias_grad", &mmattn::bias_grad_cuda);
  m.impl("layer_norm_param_grads", &mmattn::layer_norm_param_grads_cuda);
}
