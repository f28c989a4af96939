// One translation unit of the PSA CUDA code (psa_units.h): the kernels and their host code for
// the dtype MMATTN_PSA_UNIT_DTYPE (psa_dispatch.h), and the unit's implementations of the ops.
// Needs the launch interface (cuda_launch.cuh, or the tests' CPU emulation) included before.
#pragma once

#include "psa_dispatch.h"
#include "psa_block_cuda.cuh"
#include "psa_glue.cuh"
#include "psa_kernels.cuh"
#include "psa_units.h"

namespace mmattn {
namespace psa {

template <>
const UnitOps& unit_ops<at::ScalarType::MMATTN_PSA_UNIT_DTYPE>() {
  static const UnitOps ops{&psa_fwd_reduce_cuda, &psa_fwd_apply_cuda, &psa_bwd_reduce_cuda,
                           &psa_bwd_apply_cuda,  &psa_fwd_glue_cuda,  &psa_bwd_glue_cuda,
                           &block_forward,       &block_backward};
  return ops;
}

}  // namespace psa
}  // namespace mmattn
