// The warp matrix operations (<mma.h>, nvcuda::wmma: tensor cores from compute capability 8.0)
// as mmattn's kernel families use them: the CUDA type of a 16-bit scalar. On the CPU the tests'
// emulation (tests/ops/emulation/emulated_cuda.h) provides nvcuda::wmma itself.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#ifdef __CUDACC__
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>
#endif

namespace mmattn {

// The CUDA type of a 16-bit scalar, for the warp matrix operations.
template <typename T>
struct MmaType;
template <>
struct MmaType<c10::BFloat16> {
  using type = __nv_bfloat16;
};
template <>
struct MmaType<c10::Half> {
  using type = __half;
};

}  // namespace mmattn
