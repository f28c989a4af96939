// Outlook attention's CUDA kernels (Eq. 4-5 of arXiv 2106.13112, fused): the kernels and their
// host wrappers are in outlook_kernels.cuh, launched through cuda_launch.cuh.
#include <torch/library.h>

#include "cuda_launch.cuh"
#include "outlook_kernels.cuh"

TORCH_LIBRARY_IMPL(mmattn, CUDA, m) {
  m.impl("outlook_fwd", &mmattn::outlook_fwd_cuda);
  m.impl("outlook_bwd", &mmattn::outlook_bwd_cuda);
  m.impl("outlook_pool", &mmattn::outlook_pool_cuda);
  m.impl("outlook_softmax", &mmattn::outlook_softmax_cuda);
  m.impl("outlook_unpool_add", &mmattn::outlook_unpool_add_cuda);
}
