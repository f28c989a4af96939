// Elementary functions shared by the CUDA kernel families (and their CPU emulation, which
// defines __expf): float in the fast hardware approximation, double exact.
#pragma once

#include <cmath>

namespace mmattn {

__device__ __forceinline__ float op_exp(float v) { return __expf(v); }
__device__ __forceinline__ double op_exp(double v) { return ::exp(v); }

}  // namespace mmattn
