// The PSA CUDA kernels and their host code for x in bfloat16 (accumulating in float32): one of
// the four translation units of psa_units.h.
#define MMATTN_PSA_UNIT_DTYPE BFloat16

#include "cuda_launch.cuh"
#include "psa_cuda_unit.cuh"
