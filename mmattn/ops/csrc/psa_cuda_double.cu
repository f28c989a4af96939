// The PSA CUDA kernels and their host code for x in float64 (accumulating in float64): one of
// the four translation units of psa_units.h.
#define MMATTN_PSA_UNIT_DTYPE Double

#include "cuda_launch.cuh"
#include "psa_cuda_unit.cuh"
