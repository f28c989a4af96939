// mmattn::bias_grad / layer_norm_param_grads on CUDA, declared for their registration
// (cuda_ops.cpp); defined in column_sums.cuh, compiled in column_sums_cuda.cu.
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

}  // namespace mmattn
