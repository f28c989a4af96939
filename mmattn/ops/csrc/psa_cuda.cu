// Polarized Self-Attention's CUDA ops: the folded paper form's four passes over x and the
// C-sized work between them (psa_kernels.cuh, psa_glue.cuh, launched through cuda_launch.cuh),
// and the whole block per call, mmattn::psa_block_cuda_fwd / _bwd, for the four forms
// (psa_block_cuda.cuh; the release's PSA_p and PSA_s: psa_release_p.cuh, psa_release_s.cuh).
// The kernels and their host code are compiled once per dtype of x (psa_units.h): this file
// is the float32 unit (the others: psa_cuda_double.cu, psa_cuda_half.cu,
// psa_cuda_bfloat16.cu). cuda_ops.cpp registers the ops, each of which goes to the unit of its
// tensor's dtype.
#define MMATTN_PSA_UNIT_DTYPE Float

#include "cuda_launch.cuh"
#include "psa_cuda_unit.cuh"
