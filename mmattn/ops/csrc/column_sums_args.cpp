// The argument checks of the column sums (column_sums_args.h), compiled by the host compiler.
#include "column_sums_args.h"

#include <initializer_list>

namespace mmattn {

void check_column_sums_args(const char* op, const at::Tensor& grad, const at::Tensor* x,
                            const at::Tensor* mean, const at::Tensor* rstd) {
  TORCH_CHECK(grad.dim() >= 1, op, ": grad must have at least 1 dimension, got a 0-d tensor");
  if (x == nullptr) return;
  TORCH_CHECK(x->sizes() == grad.sizes(), op, ": x must have grad's shape ", grad.sizes(),
              ", got ", x->sizes());
  TORCH_CHECK(x->scalar_type() == grad.scalar_type(), op, ": x must have grad's dtype ",
              grad.scalar_type(), ", got ", x->scalar_type());
  for (const at::Tensor* t : {x, mean, rstd})
    TORCH_CHECK(t->device() == grad.device(), op, ": x, mean and rstd must be on grad's device ",
                grad.device(), ", got ", t->device());
  const int64_t C = grad.size(-1), rows = C == 0 ? 0 : grad.numel() / C;
  for (const at::Tensor* stat : {mean, rstd})
    TORCH_CHECK(stat->numel() == rows && at::isFloatingType(stat->scalar_type()), op,
                ": mean and rstd must hold one floating-point value per row (", rows, "), got ",
                stat->numel(), " values of ", stat->scalar_type());
}

}  // namespace mmattn
