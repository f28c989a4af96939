// The parameters' gradients of mmattn::linear and mmattn::layer_norm on CUDA: sums over the rows
// of a gradient (column_sums.cuh, launched through cuda_launch.cuh); cuda_ops.cpp registers
// them.
#include "cuda_launch.cuh"
#include "column_sums.cuh"
