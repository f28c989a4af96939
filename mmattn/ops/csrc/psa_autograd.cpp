// The autograd of the whole-block PSA ops (mmattn/ops/psa_block.py), registered in C++: a
// training step calls no Python per block beyond the module's forward. First-order gradients
// only.
//   psa_block_fwd (CPU, psa_cpu.cpp): saves x and the weights; its backward recomputes the rest.
//   psa_block_cuda_fwd (CUDA, psa_cuda.cu): returns y and the small tensors its backward takes
//     (never anything of x's size), saved with x and the weights.
#include <tuple>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

namespace mmattn {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using Grads = std::tuple<at::Tensor, std::vector<at::Tensor>>;

// The backward's outputs: dx, the weights' gradients, none for form and eps.
variable_list gradients(const at::Tensor& dx, const std::vector<at::Tensor>& dweights) {
  variable_list out{dx};
  out.insert(out.end(), dweights.begin(), dweights.end());
  out.emplace_back();  // form
  out.emplace_back();  // eps
  return out;
}

void keep(AutogradContext* ctx, const at::Tensor& x, at::TensorList weights,
          at::TensorList state, int64_t form, double eps) {
  std::vector<at::Tensor> saved{x};
  saved.insert(saved.end(), weights.begin(), weights.end());
  saved.insert(saved.end(), state.begin(), state.end());
  ctx->save_for_backward(saved);
  ctx->saved_data["weights"] = static_cast<int64_t>(weights.size());
  ctx->saved_data["form"] = form;
  ctx->saved_data["eps"] = eps;
}

// x, the weights and the state, as `keep` saved them.
std::tuple<at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>> kept(
    AutogradContext* ctx) {
  const auto saved = ctx->get_saved_variables();
  const auto split = saved.begin() + 1 + ctx->saved_data["weights"].toInt();
  return {saved[0], std::vector<at::Tensor>(saved.begin() + 1, split),
          std::vector<at::Tensor>(split, saved.end())};
}

class PsaBlock : public torch::autograd::Function<PsaBlock> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, at::TensorList weights,
                            int64_t form, double eps) {
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("mmattn::psa_block_fwd", "")
                         .typed<at::Tensor(const at::Tensor&, at::TensorList, int64_t, double)>();
    at::AutoDispatchBelowADInplaceOrView guard;
    keep(ctx, x, weights, {}, form, eps);
    return op.call(x, weights, form, eps);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("mmattn::psa_block_bwd", "")
                         .typed<Grads(const at::Tensor&, const at::Tensor&, at::TensorList,
                                      int64_t, double)>();
    auto [x, weights, state] = kept(ctx);
    auto [dx, dweights] = op.call(grads[0], x, weights, ctx->saved_data["form"].toInt(),
                                  ctx->saved_data["eps"].toDouble());
    return gradients(dx, dweights);
  }
};

class PsaBlockCuda : public torch::autograd::Function<PsaBlockCuda> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, at::TensorList weights,
                               int64_t form, double eps) {
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("mmattn::psa_block_cuda_fwd", "")
                         .typed<Grads(const at::Tensor&, at::TensorList, int64_t, double)>();
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [y, state] = op.call(x, weights, form, eps);
    keep(ctx, x, weights, state, form, eps);
    ctx->mark_non_differentiable(state);
    // the state takes no gradient: without this, autograd fills a zero tensor for each of its
    // 5-7 outputs on every backward, a launch each on a GPU (on an H200 a training step
    // launched 14-18 kernels per block, where the ops' own are 7-8)
    ctx->set_materialize_grads(false);
    variable_list out{y};
    out.insert(out.end(), state.begin(), state.end());
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("mmattn::psa_block_cuda_bwd", "")
                         .typed<Grads(const at::Tensor&, const at::Tensor&, at::TensorList,
                                      at::TensorList, int64_t, double)>();
    auto [x, weights, state] = kept(ctx);
    if (!grads[0].defined())  // (grads are not materialised) y took none: nor do the inputs
      return gradients(at::Tensor(), std::vector<at::Tensor>(weights.size()));
    auto [dx, dweights] = op.call(grads[0], x, state, weights, ctx->saved_data["form"].toInt(),
                                  ctx->saved_data["eps"].toDouble());
    return gradients(dx, dweights);
  }
};

at::Tensor psa_block_fwd_autograd(const at::Tensor& x, at::TensorList weights, int64_t form,
                                  double eps) {
  return PsaBlock::apply(x, weights, form, eps);
}

Grads psa_block_cuda_fwd_autograd(const at::Tensor& x, at::TensorList weights, int64_t form,
                                  double eps) {
  const variable_list out = PsaBlockCuda::apply(x, weights, form, eps);
  return {out[0], std::vector<at::Tensor>(out.begin() + 1, out.end())};
}

}  // namespace
}  // namespace mmattn

TORCH_LIBRARY_IMPL(mmattn, Autograd, m) {
  m.impl("psa_block_fwd", &mmattn::psa_block_fwd_autograd);
  m.impl("psa_block_cuda_fwd", &mmattn::psa_block_cuda_fwd_autograd);
}
