// mmattn::bias_grad / layer_norm_param_grads on CUDA, declared for their registration
// (cuda_ops.cpp, and the tests' emulation); defined in column_sums.cuh, compiled in
// column_sums_cuda.cu.
#pragma once

#include <tuple>

#include <ATen/core/Tensor.h>

namespace mmattn {

// Σ over every dimension of grad but the last.
at::Tensor bias_grad_cuda(const at::Tensor& grad);

// (the weight's Σ g x̂, the bias's Σ g) of a LayerNorm over grad's last dimension,
// x̂ = (x - mean) rstd per row.
std::tuple<at::Tensor, at::Tensor> layer_norm_param_grads_cuda(const at::Tensor& grad,
                                                               const at::Tensor& x,
                                                               const at::Tensor& mean,
                                                               const at::Tensor& rstd);

// Registers the CUDA implementations above in a torch::Library: mmattn's (cuda_ops.cpp), or the
// tests' emulated ones (a template, so that no CUDA source needs torch/library.h).
template <typename Library>
void register_column_sums_cuda_ops(Library& m) {
  m.impl("bias_grad", &bias_grad_cuda);
  m.impl("layer_norm_param_grads", &layer_norm_param_grads_cuda);
}

}  // namespace mmattn
