// Polarized Self-Attention's CUDA kernels: the folded paper form's four passes over x and the
// C-sized work between them (psa_kernels.cuh, psa_glue.cuh, launched through cuda_launch.cuh),
// and the whole block per call, mmattn::psa_block_cuda_fwd / _bwd, for the four forms
// (psa_block_cuda.cuh; the release's PSA_p and PSA_s: psa_release_p.cuh, psa_release_s.cuh).
#include <torch/library.h>

#include "cuda_launch.cuh"
#include "psa_block.h"
#include "psa_glue.cuh"
#include "psa_kernels.cuh"
#include "psa_block_cuda.cuh"

namespace mmattn {
namespace {

// A whole block per call, every form on the kernels (psa_block_cuda.cuh).
std::tuple<at::Tensor, std::vector<at::Tensor>> psa_block_cuda_fwd(const at::Tensor& x,
                                                                   at::TensorList weights,
                                                                   int64_t form, double eps) {
  check_args(x, std::vector<at::Tensor>(weights.begin(), weights.end()), form);
  return psa::block_forward(x, weights, form, eps);
}

std::tuple<at::Tensor, std::vector<at::Tensor>> psa_block_cuda_bwd(const at::Tensor& grad,
                                                                   const at::Tensor& x,
                                                                   at::TensorList state,
                                                                   at::TensorList weights,
                                                                   int64_t form, double eps) {
  check_args(x, std::vector<at::Tensor>(weights.begin(), weights.end()), form);
  TORCH_CHECK(grad.sizes() == x.sizes(), "psa_block_cuda_bwd: grad must have x's shape ",
              x.sizes(), ", got ", grad.sizes());
  return psa::block_backward(grad, x, state, weights, form, eps);
}

}  // namespace
}  // namespace mmattn

TORCH_LIBRARY_IMPL(mmattn, CUDA, m) {
  m.impl("psa_fwd_reduce", &mmattn::psa::psa_fwd_reduce_cuda);
  m.impl("psa_fwd_apply", &mmattn::psa::psa_fwd_apply_cuda);
  m.impl("psa_bwd_reduce", &mmattn::psa::psa_bwd_reduce_cuda);
  m.impl("psa_bwd_apply", &mmattn::psa::psa_bwd_apply_cuda);
  m.impl("psa_fwd_glue", &mmattn::psa::psa_fwd_glue_cuda);
  m.impl("psa_bwd_glue", &mmattn::psa::psa_bwd_glue_cuda);
  m.impl("psa_block_cuda_fwd", &mmattn::psa_block_cuda_fwd);
  m.impl("psa_block_cuda_bwd", &mmattn::psa_block_cuda_bwd);
}
