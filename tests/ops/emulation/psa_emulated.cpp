// The PSA CUDA kernels and their host code (mmattn/ops/csrc/psa_cuda_unit.cuh) compiled for the
// CPU emulation of emulated_cuda.h in psa_cuda.cu's four translation units (psa_units.h): this
// file is the float32 unit, with the tests' helpers, as psa_cuda.cu is; psa_emulated_double.cpp,
// _half.cpp and _bfloat16.cpp are the others. The ops mmattn_emulated::psa_* (the test defines
// their schemas: mmattn's) are registered as cuda_ops.cpp registers mmattn's, each going to
// the unit of its tensor's dtype.
#define MMATTN_PSA_UNIT_DTYPE Float

#include "emulated_cuda.h"

#include <torch/library.h>

#include "psa_cuda_unit.cuh"

MMATTN_EMULATED_SHARED_MEMORY(mmattn::psa::MMATTN_PSA_UNIT)

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

// Whether the forward passes take x on the register tiles (psa_register_tiles.cuh): the host
// code's decision, for the tests.
bool psa_register_tiles(const at::Tensor& x) {
  const mmattn::psa::Geometry g = mmattn::psa::geometry(x);
  bool taken = false;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(),
                                  "psa_register_tiles", [&] {
    taken = mmattn::psa::register_tiles<scalar_t>(g, {x.data_ptr()});
  });
  return taken;
}

// The blocks per image of the glue kernels for N images of C channels (glue_blocks: the
// environment, the device's multiprocessors, clusters): the host code's decision, for the tests.
int64_t psa_glue_blocks(int64_t N, int64_t C) {
  return mmattn::psa::glue_blocks(mmattn::psa::fwd_glue_kernel<double>, N, C,
                                  mmattn::psa::kGlueSmem * sizeof(double));
}

// kernel launches since the library was loaded
int64_t emulated_launches() { return mmattn_emulation::launches; }

TORCH_LIBRARY_IMPL(mmattn_emulated, CPU, m) {
  mmattn::psa::register_routed_ops(m);
  m.impl("psa_vector_width", &psa_vector_width);
  m.impl("psa_register_tiles", &psa_register_tiles);
}

// no tensor argument to dispatch on: one kernel for every key
TORCH_LIBRARY_IMPL(mmattn_emulated, CompositeImplicitAutograd, m) {
  m.impl("emulated_launches", &emulated_launches);
  m.impl("psa_glue_blocks", &psa_glue_blocks);
}
