// The PSA CUDA kernels and their host wrappers (mmattn/ops/csrc/psa_kernels.cuh) compiled for
// the CPU emulation of emulated_cuda.h, registered as the CPU implementations of the ops
// mmattn_emulated::psa_* (the test defines their schemas: mmattn's).
#include "emulated_cuda.h"

#include <torch/library.h>

#include "psa_kernels.cuh"

MMATTN_EMULATED_SHARED_MEMORY(mmattn::psa)

TORCH_LIBRARY_IMPL(mmattn_emulated, CPU, m) {
  m.impl("psa_fwd_reduce", &mmattn::psa::psa_fwd_reduce_cuda);
  m.impl("psa_fwd_apply", &mmattn::psa::psa_fwd_apply_cuda);
  m.impl("psa_bwd_reduce", &mmattn::psa::psa_bwd_reduce_cuda);
  m.impl("psa_bwd_apply", &mmattn::psa::psa_bwd_apply_cuda);
}
