// psa_cuda_half.cu's translation unit (the PSA kernels and their host code for x in float16)
// compiled for the CPU emulation of emulated_cuda.h; psa_emulated.cpp registers the ops.
#define MMATTN_PSA_UNIT_DTYPE Half

#include "emulated_cuda.h"

#include "psa_cuda_unit.cuh"

MMATTN_EMULATED_SHARED_MEMORY(mmattn::psa::MMATTN_PSA_UNIT)
