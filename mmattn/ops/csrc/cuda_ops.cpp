// The CUDA implementations of the mmattn:: ops (their schemas: mmattn/ops/extension.py),
// registered here, in a C++ file, so that no CUDA source compiles torch/library.h and the
// registration's templates (seconds of nvcc's front ends and host compile per source;
// docs/kernels.md, "Build time"). Compiled empty without WITH_CUDA (a CPU-only build).
#ifdef WITH_CUDA

#include <torch/library.h>

#include "column_sums.h"
#include "outlook.h"
#include "psa_units.h"

TORCH_LIBRARY_IMPL(mmattn, CUDA, m) {
  // Polarized Self-Attention (psa_cuda*.cu): each op goes to the unit of its tensor's dtype
  mmattn::psa::register_routed_ops(m);
  // outlook attention (outlook_cuda.cu)
  mmattn::register_outlook_cuda_ops(m);
  // the parameters' gradients of mmattn::linear / layer_norm (column_sums_cuda.cu)
  mmattn::register_column_sums_cuda_ops(m);
}

#endif  // WITH_CUDA
