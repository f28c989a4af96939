// Outlook attention's CUDA kernels (Eq. 4-5 of arXiv 2106.13112, fused): the kernels and their
// host wrappers are in outlook_kernels.cuh, launched through cuda_launch.cuh; cuda_ops.cpp
// registers them.
#include "cuda_launch.cuh"
#include "outlook_kernels.cuh"
