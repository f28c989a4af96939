// psa_cuda_bfloat16.cu's translation unit (the PSA kernels and their host code for x in bfloat16)
// compiled for the CPU emulation of emulated_cuda.h; psa_emulated.cpp registers the ops.
#define MMATTN_PSA_UNIT_DTYPE BFloat16

#include "emulated_cuda.h"

#include "psa_cuda_unit.cuh"

MMATTN_EMULATED_SHARED_MEMORY(mmattn::psa::MMATTN_PSA_UNIT)
