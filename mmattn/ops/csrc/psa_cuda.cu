// Polarized Self-Attention's CUDA kernels (the folded paper form's four passes over x, and the
// C-sized work between them): the kernels and their host wrappers are in psa_kernels.cuh and
// psa_glue.cuh, launched through cuda_launch.cuh.
#include <torch/library.h>

#include "cuda_launch.cuh"
#include "psa_glue.cuh"
#include "psa_kernels.cuh"

TORCH_LIBRARY_IMPL(mmattn, CUDA, m) {
  m.impl("psa_fwd_reduce", &mmattn::psa::psa_fwd_reduce_cuda);
  m.impl("psa_fwd_apply", &mmattn::psa::psa_fwd_apply_cuda);
  m.impl("psa_bwd_reduce", &mmattn::psa::psa_bwd_reduce_cuda);
  m.impl("psa_bwd_apply", &mmattn::psa::psa_bwd_apply_cuda);
  m.impl("psa_fwd_glue", &mmattn::psa::psa_fwd_glue_cuda);
  m.impl("psa_bwd_glue", &mmattn::psa::psa_bwd_glue_cuda);
}
