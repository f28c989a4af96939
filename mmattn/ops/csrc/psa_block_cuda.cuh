// A whole PSA block on the CUDA kernels, composed in C++: the implementation of the ops
// mmattn::psa_block_cuda_fwd / _bwd (mmattn/ops/psa_block.py) for the four forms. The forward
// returns, besides y, what its backward takes (a few (N, P), (N, C), (N, C/2) tensors: never
// anything of x's size); the autograd that pairs them is registered in C++ (psa_autograd.cpp),
// so a training step runs no Python per block beyond the module's call.
//
//   paper forms (psa_kernels.cuh, psa_glue.cuh; the folding is derived in mmattn/ops/psa.py):
//     forward 3 launches: reduce, glue, apply; backward 3: reduce, glue, and the apply pass
//     with the weight matrices' gradients (OuterSums) on blocks of its own in the same launch;
//   the release's PSA_p (psa_release_p.cuh): forward 3 (its spatial reduction and apply pass
//     in one cooperative launch; 4 where that grid would not be resident at once), backward 3;
//   the release's PSA_s (psa_release_s.cuh): where tensor cores take its value products,
//   forward 3 and backward 4 (the value map's tiles in one cooperative launch each way, the
//   backward's with M = dVl x^T, psa_value_tiles.cuh); else forward 4 and a batched GEMM,
//   backward 4 and 3 batched GEMMs between them.
// Each backward's first kernel clears one buffer that its later kernels add the weight
// gradients into (atomics); the paper forms and PSA_p form their matrices' gradients as the
// apply pass's tail (psa_kernels.cuh: blocks ahead of the pass's in its launch), PSA_s all but
// W_q's the same way (ReleaseSWeightGrads): 6 launches per block per training step (PSA_s
// 7 on tensor cores, else 12; N more where M is cut; before the tail, the weights' gradients
// were a launch of their own: 7-8, PSA_s 13; PSA_p 7 before its cooperative launch).
//
// Needs the launch interface (cuda_launch.cuh, or the tests' CPU emulation).
#pragma once

#include <tuple>
#include <vector>

#include <ATen/Context.h>
#include <ATen/core/LegacyTypeDispatch.h>

#include "psa_block.h"
#include "psa_dispatch.h"
#include "psa_glue.cuh"
#include "psa_kernels.cuh"
#include "psa_release_p.cuh"
#include "psa_release_s.cuh"

namespace mmattn {
namespace psa {
inline namespace MMATTN_PSA_UNIT {

// The paper forms: y, and [logits l (N, P), S, stats (N, 4, C) = [s, m, A, u_eff], c (N), A,
// u_eff, lnorm (2, N)] (lnorm: the state of pi = softmax_p(l), its maxima and sums).
std::tuple<at::Tensor, std::vector<at::Tensor>> paper_forward(const at::Tensor& x,
                                                              const Geometry& g,
                                                              const std::vector<at::Tensor>& W,
                                                              double eps, bool sequential) {
  auto [logits, pmax, psum, ps, pm] = fwd_reduce(x, g, W[0], 0);
  const at::Tensor a = at::empty({x.size(0), g.C}, logits.options()), ueff = at::empty_like(a);
  auto [lnorm, stats, c] = fwd_glue(pmax, psum, ps, pm, g.P, at::TensorList(W).slice(2), eps,
                                    sequential, a, ueff);
  auto [y, s_mask] = fwd_apply(x, a, ueff, c, SoftmaxStates{}, sequential);
  return {y, {logits, s_mask, stats, c, a, ueff, lnorm}};
}

// dL/dx and the 12 weights' gradients in the accumulation dtype, in the op's order. ch_bq's is
// exactly 0 (the softmax over pixels removes the bias).
std::tuple<at::Tensor, std::vector<at::Tensor>> paper_backward(
    const at::Tensor& grad, const at::Tensor& x, const std::vector<at::Tensor>& saved,
    const std::vector<at::Tensor>& W, double eps, bool sequential) {
  const at::Tensor &logits = saved[0], &s_mask = saved[1], &stats = saved[2], &a = saved[4],
                   &ueff = saved[5], &lnorm = saved[6];
  const int64_t C = a.size(1), H = C / 2;
  // The atomic adds' target, cleared by the reduction: W_q's gradient (C, from the apply pass),
  // ch_bq's (exactly 0), the vector gradients (3 C/2 + 3 C, from the glue; sp_bv, sp_bq, ch_bv
  // (C/2 each), ln_weight, ln_bias, ch_bz (C each))
  const at::Tensor flat = at::empty({C + 1 + 3 * H + 3 * C}, a.options());
  auto [d_t, part_da, part_dueff, unused, part_dt] =
      bwd_reduce(grad, x, a, s_mask, SoftmaxStates{}, 0, sequential, flat);
  const at::Tensor vec_grads = flat.narrow(0, C + 1, 3 * H + 3 * C);
  auto [dm, dsv, beta, left, right, no_vecs] =
      bwd_glue(part_dt, part_da, part_dueff, stats, logits.size(1), at::TensorList(W).slice(2),
               eps, sequential, vec_grads);
  const at::Tensor gwq = flat.narrow(0, 0, C);
  // the apply pass, and in the same launch the weight matrices' gradients: (4, C/2, C), ch_wz's
  // (2) C x C/2
  const at::Tensor mats = at::empty({4, H, C}, a.options());
  at::Tensor dx = std::get<0>(bwd_apply(grad, x, a, s_mask, logits, lnorm, d_t, ueff, dm, dsv,
                                        W[0], beta, 0, sequential, gwq, at::Tensor(),
                                        SoftmaxStates{}, at::Tensor(),
                                        OuterSumsTail{left, right, mats, 2}));
  const auto v = vec_grads.split_with_sizes({H, H, H, C, C, C});
  return {dx,
          {gwq, flat.narrow(0, C, 1), mats[3], v[2], mats[2].view({C, H}), v[5], v[3], v[4],
           mats[1], v[1], mats[0], v[0]}};
}

// x made dense in its own memory format (NCHW or channels_last), as the kernels need.
inline at::Tensor dense(const at::Tensor& x) { return x.contiguous(x.suggest_memory_format()); }

// psa_block_cuda_fwd (the form checked by the caller).
std::tuple<at::Tensor, std::vector<at::Tensor>> block_forward(const at::Tensor& x_in,
                                                              at::TensorList weights,
                                                              int64_t form, double eps) {
  const launch::DeviceGuard guard(x_in.device());
  // the ATen operators below are the kernel's own work: no autograd for them (the weights may
  // require grad when the op is called directly)
  const at::AutoDispatchBelowADInplaceOrView no_autograd;
  const at::Tensor x = dense(x_in);
  const Geometry g = geometry(x);
  const auto W = acc_weights(weights, form, g.C, at::toOpMathType(x.scalar_type()));
  if (form == kReleaseP) return release_p_forward(x, g, W);
  if (form == kReleaseS) return release_s_forward(x, g, W, eps);
  return paper_forward(x, g, W, eps, form == kPaperSequential);
}

// psa_block_cuda_bwd: dL/dx, and the gradients in the weights' shapes and dtypes.
std::tuple<at::Tensor, std::vector<at::Tensor>> block_backward(
    const at::Tensor& grad_in, const at::Tensor& x_in, at::TensorList saved_in,
    at::TensorList weights, int64_t form, double eps) {
  const launch::DeviceGuard guard(x_in.device());
  const at::AutoDispatchBelowADInplaceOrView no_autograd;
  // as PyTorch's own ops do: an error under torch.use_deterministic_algorithms(True), a warning
  // in its warn-only mode
  at::globalContext().alertNotDeterministic(
      "mmattn::psa_block_cuda_bwd (the weight gradients are added up with atomics)");
  const at::Tensor x = dense(x_in);
  const at::Tensor grad = grad_in.to(x.scalar_type()).contiguous(x.suggest_memory_format());
  const Geometry g = geometry(x);
  const auto W = acc_weights(weights, form, g.C, at::toOpMathType(x.scalar_type()));
  const std::vector<at::Tensor> saved(saved_in.begin(), saved_in.end());
  auto [dx, acc_grads] =
      form == kReleaseP   ? release_p_backward(grad, x, g, saved, W)
      : form == kReleaseS ? release_s_backward(grad, x, g, saved, W)
                          : paper_backward(grad, x, saved, W, eps, form == kPaperSequential);
  return {dx, weight_gradients(acc_grads, weights)};
}

}  // namespace MMATTN_PSA_UNIT
}  // namespace psa
}  // namespace mmattn
