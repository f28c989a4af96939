// The PSA CUDA kernels and their host wrappers (mmattn/ops/csrc/psa_kernels.cuh and
// psa_glue.cuh) compiled for the CPU emulation of emulated_cuda.h, registered as the CPU
// implementations of the ops mmattn_emulated::psa_* (the test defines their schemas: mmattn's).
#include "emulated_cuda.h"

#include <torch/library.h>

#include "psa_glue.cuh"
#include "psa_kernels.cuh"

MMATTN_EMULATED_SHARED_MEMORY(mmattn::psa)

// The vector width the PSA kernels move x in (16-byte vectors, or 1: single elements) with the
// shared memory of `tiles` tiles per block: the host code's decision, for the tests.
int64_t psa_vector_width(const at::Tensor& x, int64_t tiles) {
  const mmattn::psa::Geometry g = mmattn::psa::geometry(x);
  int64_t width = 1;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "psa_vector_width",
                                  [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const mmattn::psa::Launch l = mmattn::psa::plan(g.C, sizeof(acc_t), tiles, 0, 0);
    if (mmattn::psa::vectorizable<scalar_t>(g, l, {x.data_ptr()}))
      width = mmattn::kPack16<scalar_t>;
  });
  return width;
}

TORCH_LIBRARY_IMPL(mmattn_emulated, CPU, m) {
  m.impl("psa_vector_width", &psa_vector_width);
  m.impl("psa_fwd_reduce", &mmattn::psa::psa_fwd_reduce_cuda);
  m.impl("psa_fwd_apply", &mmattn::psa::psa_fwd_apply_cuda);
  m.impl("psa_bwd_reduce", &mmattn::psa::psa_bwd_reduce_cuda);
  m.impl("psa_bwd_apply", &mmattn::psa::psa_bwd_apply_cuda);
  m.impl("psa_fwd_glue", &mmattn::psa::psa_fwd_glue_cuda);
  m.impl("psa_bwd_glue", &mmattn::psa::psa_bwd_glue_cuda);
}
