// Polarized Self-Attention's CUDA host code and kernels in four translation units, one per
// dtype of x: psa_cuda.cu (float32), psa_cuda_double.cu, psa_cuda_half.cu and
// psa_cuda_bfloat16.cu each compile the PSA headers (psa_cuda_unit.cuh) with the dtype dispatch
// narrowed to their dtype and everything the headers define in a namespace of their own, so
// that the compiler runs the four at once (docs/kernels.md, "Build time"). cuda_ops.cpp
// registers the ops of `routed` below, each of which calls the implementation of the unit of
// its tensor's dtype (UnitOps, unit_for). A unit's dispatch: psa_dispatch.h.
#pragma once

#include <cstdint>
#include <tuple>
#include <vector>

#include <ATen/core/Tensor.h>

#include "psa_block.h"

namespace mmattn {
namespace psa {

// A unit's implementations of the ops (registered by cuda_ops.cpp; their schemas are in
// mmattn/ops/extension.py); psa_block_cuda_fwd/_bwd's arguments are checked before.
struct UnitOps {
  using T = at::Tensor;
  using Block = std::tuple<T, std::vector<T>>;
  std::tuple<T, T, T, T, T> (*fwd_reduce)(const T& x, const T& wq, int64_t splits);
  std::tuple<T, T> (*fwd_apply)(const T& x, const T& a, const T& u, const T& bias,
                                bool sequential);
  std::tuple<T, T, T, T> (*bwd_reduce)(const T& grad, const T& x, const T& a, const T& s_mask,
                                       int64_t splits, bool sequential);
  std::tuple<T, T> (*bwd_apply)(const T& grad, const T& x, const T& a, const T& s_mask,
                                const T& logits, const T& lnorm, const T& d_t, const T& u,
                                const T& dm, const T& dsv, const T& wq, const T& beta,
                                int64_t splits, bool sequential);
  std::tuple<T, T, T> (*fwd_glue)(const T& pmax, const T& psum, const T& ps, const T& pm,
                                  int64_t pixels, at::TensorList weights, double eps,
                                  bool sequential);
  std::tuple<T, T, T, T, T, T> (*bwd_glue)(const T& part_dt, const T& part_da,
                                           const T& part_dueff, const T& stats, int64_t pixels,
                                           at::TensorList weights, double eps, bool sequential);
  Block (*block_fwd)(const T& x, at::TensorList weights, int64_t form, double eps);
  Block (*block_bwd)(const T& grad, const T& x, at::TensorList state, at::TensorList weights,
                     int64_t form, double eps);
};

// The unit of each dtype (psa_cuda_unit.cuh defines them).
template <at::ScalarType dtype>
const UnitOps& unit_ops();
template <>
const UnitOps& unit_ops<at::ScalarType::Float>();
template <>
const UnitOps& unit_ops<at::ScalarType::Double>();
template <>
const UnitOps& unit_ops<at::ScalarType::Half>();
template <>
const UnitOps& unit_ops<at::ScalarType::BFloat16>();

// The unit for a tensor of this dtype (x's, or the glue's accumulation dtype); the float32 unit
// for any other, whose dispatch then names the dtype in its error, as before the split.
inline const UnitOps& unit_for(at::ScalarType dtype) {
  switch (dtype) {
    case at::ScalarType::Double: return unit_ops<at::ScalarType::Double>();
    case at::ScalarType::Half: return unit_ops<at::ScalarType::Half>();
    case at::ScalarType::BFloat16: return unit_ops<at::ScalarType::BFloat16>();
    default: return unit_ops<at::ScalarType::Float>();
  }
}

// The ops as cuda_ops.cpp registers them: each goes to the unit of its tensor's dtype.
namespace routed {

using T = at::Tensor;

inline std::tuple<T, T, T, T, T> fwd_reduce(const T& x, const T& wq, int64_t splits) {
  return unit_for(x.scalar_type()).fwd_reduce(x, wq, splits);
}

inline std::tuple<T, T> fwd_apply(const T& x, const T& a, const T& u, const T& bias,
                                  bool sequential) {
  return unit_for(x.scalar_type()).fwd_apply(x, a, u, bias, sequential);
}

inline std::tuple<T, T, T, T> bwd_reduce(const T& grad, const T& x, const T& a,
                                         const T& s_mask, int64_t splits, bool sequential) {
  return unit_for(x.scalar_type()).bwd_reduce(grad, x, a, s_mask, splits, sequential);
}

inline std::tuple<T, T> bwd_apply(const T& grad, const T& x, const T& a, const T& s_mask,
                                  const T& logits, const T& lnorm, const T& d_t, const T& u,
                                  const T& dm, const T& dsv, const T& wq, const T& beta,
                                  int64_t splits, bool sequential) {
  return unit_for(x.scalar_type())
      .bwd_apply(grad, x, a, s_mask, logits, lnorm, d_t, u, dm, dsv, wq, beta, splits,
                 sequential);
}

// (the glue's tensors are in the accumulation dtype: float32's unit, or float64's)
inline std::tuple<T, T, T> fwd_glue(const T& pmax, const T& psum, const T& ps, const T& pm,
                                    int64_t pixels, at::TensorList weights, double eps,
                                    bool sequential) {
  return unit_for(pmax.scalar_type())
      .fwd_glue(pmax, psum, ps, pm, pixels, weights, eps, sequential);
}

inline std::tuple<T, T, T, T, T, T> bwd_glue(const T& part_dt, const T& part_da,
                                             const T& part_dueff, const T& stats,
                                             int64_t pixels, at::TensorList weights,
                                             double eps, bool sequential) {
  return unit_for(part_dt.scalar_type())
      .bwd_glue(part_dt, part_da, part_dueff, stats, pixels, weights, eps, sequential);
}

// A whole block per call, every form on the kernels (psa_block_cuda.cuh), its arguments
// checked first.
inline UnitOps::Block block_fwd(const T& x, at::TensorList weights, int64_t form, double eps) {
  check_args(x, std::vector<T>(weights.begin(), weights.end()), form);
  return unit_for(x.scalar_type()).block_fwd(x, weights, form, eps);
}

inline UnitOps::Block block_bwd(const T& grad, const T& x, at::TensorList state,
                                at::TensorList weights, int64_t form, double eps) {
  check_args(x, std::vector<T>(weights.begin(), weights.end()), form);
  TORCH_CHECK(grad.sizes() == x.sizes(), "psa_block_cuda_bwd: grad must have x's shape ",
              x.sizes(), ", got ", grad.sizes());
  return unit_for(x.scalar_type()).block_bwd(grad, x, state, weights, form, eps);
}

}  // namespace routed

// Registers the ops of `routed` in a torch::Library: mmattn's CUDA implementations
// (cuda_ops.cpp), or the tests' emulated ones.
template <typename Library>
void register_routed_ops(Library& m) {
  m.impl("psa_fwd_reduce", &routed::fwd_reduce);
  m.impl("psa_fwd_apply", &routed::fwd_apply);
  m.impl("psa_bwd_reduce", &routed::bwd_reduce);
  m.impl("psa_bwd_apply", &routed::bwd_apply);
  m.impl("psa_fwd_glue", &routed::fwd_glue);
  m.impl("psa_bwd_glue", &routed::bwd_glue);
  m.impl("psa_block_cuda_fwd", &routed::block_fwd);
  m.impl("psa_block_cuda_bwd", &routed::block_bwd);
}

}  // namespace psa
}  // namespace mmattn
