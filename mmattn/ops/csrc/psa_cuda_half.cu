// The PSA CUDA kernels and their host code for x in float16 (accumulating in float32): one of
// the four translation units of psa_units.h.
#define MMATTN_PSA_UNIT_DTYPE Half
#define MMATTN_PSA_UNIT_ACC Float
#define MMATTN_PSA_UNIT half_unit

#include "cuda_launch.cuh"
#include "psa_cuda_unit.cuh"
