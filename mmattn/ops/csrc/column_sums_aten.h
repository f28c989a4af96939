// The column sums of column_sums.cuh with ATen's operators: Σ_r g and, where x is given,
// Σ_r g x̂ (x̂ = (x - mean) rstd per row) over the rows of grad viewed as (rows, C), C its last
// dimension, in the accumulation type and rounded to grad's dtype. The CPU implementations of
// mmattn::bias_grad / layer_norm_param_grads (param_grads.cpp) and the CUDA host code's
// fallback past a grid's column tiles (column_sums.cuh).
#pragma once

#include <vector>

#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>

namespace mmattn {

inline std::vector<at::Tensor> aten_column_sums(const at::Tensor& grad, const at::Tensor* x,
                                                const at::Tensor* mean, const at::Tensor* rstd) {
  const int64_t C = grad.size(-1);
  const auto acc = at::toOpMathType(grad.scalar_type());
  const at::Tensor g = grad.reshape({-1, C}).to(acc);
  std::vector<at::Tensor> sums{g.sum(0).to(grad.scalar_type())};
  if (x != nullptr) {
    const at::Tensor xhat = x->reshape({-1, C}).to(acc).sub(mean->reshape({-1, 1}).to(acc))
                                .mul(rstd->reshape({-1, 1}).to(acc));
    sums.push_back(g.mul(xhat).sum(0).to(grad.scalar_type()));
  }
  return sums;
}

}  // namespace mmattn
