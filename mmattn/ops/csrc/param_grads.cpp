// A linear layer and a LayerNorm (over the last dimension) whose parameters' gradients are sums
// over the rows of the output gradient computed by mmattn::bias_grad /
// mmattn::layer_norm_param_grads (CUDA: column_sums.cuh; CPU: ATen's sums, here), with the
// autograd registered in C++ (a training step runs no Python per layer beyond the module's
// forward). First-order gradients only.
//   linear(x, W, b) = x Wᵀ + b:  dx = g W, dW = gᵀ x, db = Σ_rows g
//   layer_norm(x, w, b) = x̂ w + b, x̂ = (x - μ) σ⁻¹ per row:  dx from ATen's LayerNorm backward
//     (without its parameter reduction), dw = Σ_rows g x̂, db = Σ_rows g
#include <tuple>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include "column_sums_args.h"
#include "column_sums_aten.h"

namespace mmattn {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

at::Tensor rows_of(const at::Tensor& t) { return t.reshape({-1, t.size(-1)}); }

at::Tensor bias_grad_cpu(const at::Tensor& grad) {
  check_column_sums_args("bias_grad", grad, nullptr, nullptr, nullptr);
  return aten_column_sums(grad, nullptr, nullptr, nullptr)[0];
}

std::tuple<at::Tensor, at::Tensor> layer_norm_param_grads_cpu(const at::Tensor& grad,
                                                              const at::Tensor& x,
                                                              const at::Tensor& mean,
                                                              const at::Tensor& rstd) {
  check_column_sums_args("layer_norm_param_grads", grad, &x, &mean, &rstd);
  const std::vector<at::Tensor> sums = aten_column_sums(grad, &x, &mean, &rstd);
  return {sums[1], sums[0]};
}

at::Tensor bias_grad(const at::Tensor& grad) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("mmattn::bias_grad", "")
                       .typed<at::Tensor(const at::Tensor&)>();
  return op.call(grad);
}

std::tuple<at::Tensor, at::Tensor> layer_norm_param_grads(const at::Tensor& grad,
                                                          const at::Tensor& x,
                                                          const at::Tensor& mean,
                                                          const at::Tensor& rstd) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("mmattn::layer_norm_param_grads", "")
                       .typed<std::tuple<at::Tensor, at::Tensor>(
                           const at::Tensor&, const at::Tensor&, const at::Tensor&,
                           const at::Tensor&)>();
  return op.call(grad, x, mean, rstd);
}

// The forwards below autograd: ATen's own.
at::Tensor linear_forward(const at::Tensor& x, const at::Tensor& weight,
                          const c10::optional<at::Tensor>& bias) {
  return at::linear(x, weight, bias);
}

at::Tensor layer_norm_forward(const at::Tensor& x, const at::Tensor& weight,
                              const c10::optional<at::Tensor>& bias, double eps) {
  return at::layer_norm(x, {x.size(-1)}, weight, bias, eps);
}

class Linear : public torch::autograd::Function<Linear> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight,
                            const c10::optional<at::Tensor>& bias) {
    at::AutoDispatchBelowADInplaceOrView guard;
    ctx->save_for_backward({x, weight});
    ctx->saved_data["bias"] = bias.has_value() && bias->defined();
    return linear_forward(x, weight, bias);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &weight = saved[1], &g = grads[0];
    if (!g.defined()) return {at::Tensor(), at::Tensor(), at::Tensor()};
    at::Tensor dx, dw, db;
    if (ctx->needs_input_grad(0)) dx = g.matmul(weight);
    const at::Tensor g2 = rows_of(g);
    if (ctx->needs_input_grad(1)) dw = g2.t().mm(rows_of(x));
    if (ctx->saved_data["bias"].toBool() && ctx->needs_input_grad(2)) db = bias_grad(g2);
    return {dx, dw, db};
  }
};

class LayerNorm : public torch::autograd::Function<LayerNorm> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight,
                            const c10::optional<at::Tensor>& bias, double eps) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [y, mean, rstd] = at::native_layer_norm(x, {x.size(-1)}, weight, bias, eps);
    ctx->save_for_backward({x, weight, mean, rstd});
    ctx->saved_data["bias"] = bias.has_value() && bias->defined();
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &weight = saved[1], &mean = saved[2], &rstd = saved[3];
    const at::Tensor& g = grads[0];
    if (!g.defined()) return {at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
    at::Tensor dx, dw, db;
    if (ctx->needs_input_grad(0)) {
      // ATen's input gradient alone: with the parameters' gradients masked off, its CUDA
      // backward skips its own column reduction
      dx = std::get<0>(at::native_layer_norm_backward(g, x, {x.size(-1)}, mean, rstd, weight,
                                                      c10::nullopt, {true, false, false}));
    }
    const bool want_b = ctx->saved_data["bias"].toBool() && ctx->needs_input_grad(2);
    if (ctx->needs_input_grad(1) || want_b) {
      std::tie(dw, db) = layer_norm_param_grads(g.contiguous(), x.contiguous(), mean, rstd);
      if (!ctx->needs_input_grad(1)) dw = at::Tensor();
      if (!want_b) db = at::Tensor();
    }
    return {dx, dw, db, at::Tensor()};
  }
};

at::Tensor linear_autograd(const at::Tensor& x, const at::Tensor& weight,
                           const c10::optional<at::Tensor>& bias) {
  return Linear::apply(x, weight, bias);
}

at::Tensor layer_norm_autograd(const at::Tensor& x, const at::Tensor& weight,
                               const c10::optional<at::Tensor>& bias, double eps) {
  return LayerNorm::apply(x, weight, bias, eps);
}

}  // namespace
}  // namespace mmattn

TORCH_LIBRARY_IMPL(mmattn, CPU, m) {
  m.impl("bias_grad", &mmattn::bias_grad_cpu);
  m.impl("layer_norm_param_grads", &mmattn::layer_norm_param_grads_cpu);
}

TORCH_LIBRARY_IMPL(mmattn, CompositeExplicitAutograd, m) {
  m.impl("linear", &mmattn::linear_forward);
  m.impl("layer_norm", &mmattn::layer_norm_forward);
}

TORCH_LIBRARY_IMPL(mmattn, Autograd, m) {
  m.impl("linear", &mmattn::linear_autograd);
  m.impl("layer_norm", &mmattn::layer_norm_autograd);
}
