// The PSA CUDA kernels and their host code for x in float16 (accumulating in float32): one of
// the four translation units of psa_units.h.
#define MMATTN_PSA_UNIT_DTYPE Half

#include "cuda_launch.cuh"
#include "psa_cuda_unit.cuh"
