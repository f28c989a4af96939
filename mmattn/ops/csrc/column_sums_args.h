// The argument checks of mmattn::bias_grad / layer_norm_param_grads, one function for the CPU
// implementations (param_grads.cpp) and the CUDA host code (column_sums.cuh), defined in
// column_sums_args.cpp.
#pragma once

#include <ATen/core/Tensor.h>

namespace mmattn {

// grad has at least one dimension; where x is given: x has grad's shape and dtype, and x, mean
// and rstd are on grad's device, mean and rstd floating point with a value per row of grad
// viewed as (rows, C), C its last dimension. `op` names the operator in the errors.
void check_column_sums_args(const char* op, const at::Tensor& grad, const at::Tensor* x,
                            const at::Tensor* mean, const at::Tensor* rstd);

}  // namespace mmattn
