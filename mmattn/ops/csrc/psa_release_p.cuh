// The authors' PSA_p (DeLightCMU/PSA; mmattn.layers.PolarizedSelfAttention, variant='official',
// mode='parallel') on the CUDA pass kernels of psa_kernels.cuh: the C-sized work between the
// passes as two glue kernels (a team of blocks per image, like psa_glue.cuh), and a block's forward
// and backward composed of them (psa_block_cuda.cuh; cuda_ops.cpp registers it, the CPU
// emulation runs it in the tests).
//
// Per image (x[c][p], C channels, P pixels, C/2 = H; weights as matrices: wq = conv_q_right,
// W_v = conv_v_right, W_up = conv_up, W_q' = conv_q_left, W_v' = conv_v_left):
//   channel: l_p = wq . x_p, pi = softmax_p(l), s = sum_p pi_p x_p, v = W_v s, A = sigmoid(W_up v)
//   spatial: m = mean_p x_p, q = W_q' m, u = W_v'^T q, t_p = u . x_p, sig = softmax_p(t),
//            S_p = sigmoid(sig_p);   y = x (A + S)
// Forward, 3 launches: the reduction of the paper form (l's online softmax, s, m), the glue
// (A, u), then in one cooperative launch (fwd_reduce_apply) the same reduction with u per image
// (t's online softmax), a grid-wide barrier and the apply pass (S from t, y; it also merges t's
// softmax state for the backward); those two as 2 launches where the grid would not be
// resident at once or MMATTN_PSA_COOPERATIVE=0. Backward, 3 launches: the backward
// reduction (dA, and with the factor sig_p, d u, sum_p x_p sig_p and the splits' sums of
// w_t = sig_p dL/dsig_p), the glue (the softmax over pixels' second term beta_t = sum_p w_t, the
// chain's derivative) and the paper form's backward apply pass, which forms S and
// dL/dt = w_t - beta_t sig_p from t per pixel and whose dx has exactly PSA_p's terms:
// G (A + S) + u d_t + dm + ds pi + wq d_l; in the same launch, on blocks of their own, the
// weight matrices' gradients, sums of per-image outer products (OuterSums), as for the paper
// form. The glues touch nothing per
// pixel.
//
// Needs psa_kernels.cuh and psa_glue.cuh, and the launch interface (cuda_launch.cuh, or the
// tests' CPU emulation).
#pragma once

#include <tuple>
#include <vector>

#include "psa_block.h"
#include "psa_dispatch.h"
#include "psa_glue.cuh"
#include "psa_kernels.cuh"

namespace mmattn {
namespace psa {
inline namespace MMATTN_PSA_UNIT {

template <typename T>
struct ReleaseP {
  const T *wv, *wup, *wq2, *wv2;  // conv_v_right (H, C), conv_up (C, H), conv_q_left and
                                  // conv_v_left (H, C)
};

// Image n: stats rows (4, N, C) = [s, m, A, u], small rows (2, N, H) = [v, q]; lnorm (2, N),
// the state of pi = softmax_p(l).
template <typename T>
__global__ void __launch_bounds__(kGlueThreads, 1)
release_p_fwd_glue_kernel(int blocks, const T* __restrict__ pmax, const T* __restrict__ psum,
                          const T* __restrict__ ps, const T* __restrict__ pm, int N, int S,
                          int C, int P, ReleaseP<T> w, T* __restrict__ lnorm,
                          T* __restrict__ stats, T* __restrict__ small) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* scratch = glue_scratch<T>(smem_raw);
  const Team team(blocks);
  const int n = team.n, H = C / 2;
  auto row = [&](int k) { return stats + (static_cast<int64_t>(k) * N + n) * C; };
  T *s = row(0), *m = row(1), *a = row(2), *u = row(3);
  T* v = small + static_cast<int64_t>(n) * H;
  T* q = small + (static_cast<int64_t>(N) + n) * H;
  write_norm(merge_splits(team, pmax, psum, ps, pm, S, C, P, s, m, scratch), team, lnorm);
  const T* none = nullptr;
  rows_dot(team, w.wv, s, none, H, C, v);    // v = W_v s
  rows_dot(team, w.wq2, m, none, H, C, q);   // q = W_q' m
  team.sync();
  rows_dot(team, w.wup, v, none, C, H, a);   // z = W_up v
  cols_dot(team, w.wv2, q, H, C, u, scratch);  // u = W_v'^T q
  __syncthreads();  // (the block's rows of z)
  team.each(C, [&](int c) { a[c] = op_sigmoid(a[c]); });  // A = sigmoid(z)
}

// Image n of the backward. In: the splits' partial sums (bwd_reduce, `S` splits) of
// w_t = sig_p dL/d(sig_p) (N, S), and (N, S, C) of dA = sum_p G x, sum_p x w_t and
// r = sum_p x sig; the forward's stats and small rows. Out: beta_t = sum_p w_t (N), with which
// the backward apply pass forms dL/dt = w_t - beta_t sig per pixel; dm = dL/dm / P,
// ds = dL/ds (N, C), beta = ds . s (N): what the backward apply pass takes; the weight
// gradients' factors left (4, N, H) = [q, dq, v, dv] and right (4, N, C) = [du, m, dz, s]
// (their outer products summed over the images are dW_v', dW_q', dW_up^T, dW_v).
template <typename T>
__global__ void __launch_bounds__(kGlueThreads, 1)
release_p_bwd_glue_kernel(int blocks, const T* __restrict__ part_wt, const T* __restrict__ part_da,
                          const T* __restrict__ part_du, const T* __restrict__ part_r, int S,
                          const T* __restrict__ stats, const T* __restrict__ small, int N, int C,
                          int P, ReleaseP<T> w, T* __restrict__ beta_t_out, T* __restrict__ dm,
                          T* __restrict__ dsv, T* __restrict__ beta, T* __restrict__ left,
                          T* __restrict__ right) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* scratch = glue_scratch<T>(smem_raw);
  const Team team(blocks);
  const int n = team.n, H = C / 2;
  auto row = [&](int k) { return stats + (static_cast<int64_t>(k) * N + n) * C; };
  auto L = [&](int k) { return left + (static_cast<int64_t>(k) * N + n) * H; };
  auto R = [&](int k) { return right + (static_cast<int64_t>(k) * N + n) * C; };
  const T *s = row(0), *m = row(1), *a = row(2);
  const T* v = small + static_cast<int64_t>(n) * H;
  const T* q = small + (static_cast<int64_t>(N) + n) * H;

  // sig = softmax_p(t): dL/dt_p = sig_p (dL/dsig_p - sum sig dL/dsig) = w_t - beta_t sig_p, so
  // du = sum_p x_p dL/dt_p = sum_p x_p w_t - beta_t r
  const T beta_t = sum_split_values(part_wt, n, S, scratch);
  if (team.lead()) beta_t_out[n] = beta_t;
  // r (in m's row until below), du's first term, dA
  sum_splits<3>(team, S, C, Unweighted{}, scratch + kGlueWarps, part_r, R(1), part_du, R(0),
                part_da, R(2));
  team.each(C, [&](int c) {
    R(0)[c] -= beta_t * R(1)[c];  // du = sum_p x_p w_t - beta_t r
    R(1)[c] = m[c];
    R(3)[c] = s[c];
    R(2)[c] = R(2)[c] * a[c] * (T(1) - a[c]);  // A = sigmoid(z): dz = dA A (1 - A)
  });
  team.each(H, [&](int j) {
    L(0)[j] = q[j];
    L(2)[j] = v[j];
  });
  team.sync();
  // u = W_v'^T q: dq = W_v' du;  z = W_up v: dv = W_up^T dz
  rows_dot(team, w.wv2, R(0), static_cast<const T*>(nullptr), H, C, L(1));
  cols_dot(team, w.wup, R(2), C, H, L(3), scratch);
  team.sync();
  // q = W_q' m: dm = W_q'^T dq (over P: the mean);  v = W_v s: ds = W_v^T dv
  T* dmn = dm + static_cast<int64_t>(n) * C;
  T* dsn = dsv + static_cast<int64_t>(n) * C;
  cols_dot(team, w.wq2, L(1), H, C, dmn, scratch);
  cols_dot(team, w.wv, L(3), H, C, dsn, scratch);
  team.each(C, [&](int c) { dmn[c] /= P; });  // (the columns this thread just wrote)
  team.sync();
  lead_dot(team, dsn, s, C, scratch, beta + n);
}

// ---------------------------------------------------------------- host side
template <typename T>
ReleaseP<T> release_p_chain(const std::vector<at::Tensor>& W) {
  return {W[1].data_ptr<T>(), W[2].data_ptr<T>(), W[3].data_ptr<T>(), W[4].data_ptr<T>()};
}

// What the forward's first reduction and the glue give: the channel logits l (N, P) and lnorm
// (2, N), the state of their softmax over the pixels; stats (4, N, C) = [s, m, A, u], small
// (2, N, H) = [v, q].
struct ReleasePChannel {
  at::Tensor logits, lnorm, stats, small;
};

ReleasePChannel release_p_channel(const at::Tensor& x, const Geometry& g,
                                  const std::vector<at::Tensor>& W) {
  const int64_t N = x.size(0), C = g.C, P = g.P;
  ReleasePChannel r;
  at::Tensor pmax, psum, ps, pm;  // (not structured bindings: a lambda captures them)
  std::tie(r.logits, pmax, psum, ps, pm) = fwd_reduce(x, g, W[0], 0);
  const auto opts = r.logits.options();
  r.lnorm = at::empty({2, N}, opts);
  r.stats = at::empty({4, N, C}, opts);
  r.small = at::empty({2, N, C / 2}, opts);
  if (N > 0) MMATTN_PSA_DISPATCH_ACC(opts.dtype().toScalarType(), "psa_release_p_fwd_glue", [&] {
    glue_launch(release_p_fwd_glue_kernel<scalar_t>, N, C, sizeof(scalar_t),
                pmax.data_ptr<scalar_t>(), psum.data_ptr<scalar_t>(), ps.data_ptr<scalar_t>(),
                pm.data_ptr<scalar_t>(), static_cast<int>(N), static_cast<int>(pmax.size(1)),
                static_cast<int>(C), static_cast<int>(P), release_p_chain<scalar_t>(W),
                r.lnorm.data_ptr<scalar_t>(), r.stats.data_ptr<scalar_t>(),
                r.small.data_ptr<scalar_t>());
  });
  return r;
}

// PSA_p's output for x (N, C, H, W, dense in its memory format) and the weights in the
// accumulation dtype (acc_weights of psa_block.h), with what its backward takes: [logits, t,
// norm, stats, small, lnorm] (t (N, P): the spatial logits; norm (2, N): their softmax's merged
// state; lnorm the channel softmax's). After the glue, the spatial reduction (u per image) and
// the apply pass run in one cooperative launch where fwd_reduce_apply can, else in two.
std::tuple<at::Tensor, std::vector<at::Tensor>> release_p_forward(
    const at::Tensor& x, const Geometry& g, const std::vector<at::Tensor>& W) {
  const ReleasePChannel r = release_p_channel(x, g, W);
  const at::Tensor u = r.stats[3], a = r.stats[2];
  at::Tensor norm = at::empty({2, x.size(0)}, r.lnorm.options());
  auto [y, t] = fwd_reduce_apply(x, g, u, a, norm);
  if (!y.defined()) {
    auto [logits, tmax, tsum, ps_t, pm_t] = fwd_reduce(x, g, u, 0);
    t = logits;
    y = std::get<0>(fwd_apply(x, a, at::Tensor(), at::Tensor(), {t, tmax, tsum}, false, norm));
  }
  return {y, {r.logits, t, norm, r.stats, r.small, r.lnorm}};
}

// dL/dx and the weights' gradients in the accumulation dtype, in the op's order.
std::tuple<at::Tensor, std::vector<at::Tensor>> release_p_backward(
    const at::Tensor& grad, const at::Tensor& x, const Geometry& g,
    const std::vector<at::Tensor>& saved, const std::vector<at::Tensor>& W) {
  const int64_t N = x.size(0), C = g.C, H = C / 2, P = g.P;
  const at::Tensor &logits = saved[0], &t = saved[1], &norm = saved[2], &stats = saved[3],
                   &small = saved[4], &lnorm = saved[5];
  const at::Tensor a = stats[2];
  const SoftmaxStates spatial{t, norm[0].view({N, 1}), norm[1].view({N, 1})};
  // (not structured bindings: a lambda captures them)
  at::Tensor w_t, part_da, part_du, part_r, part_wt;
  // W_q's gradient: cleared by the reduction, added into by the apply pass
  const at::Tensor gwq = at::empty({C}, a.options());
  std::tie(w_t, part_da, part_du, part_r, part_wt) =
      bwd_reduce(grad, x, a, at::Tensor(), spatial, 0, false, gwq);
  const auto opts = w_t.options();
  at::Tensor beta_t = at::empty({N}, opts);
  at::Tensor dm = at::empty({N, C}, opts), dsv = at::empty({N, C}, opts);
  at::Tensor beta = at::empty({N}, opts);
  at::Tensor left = at::empty({4, N, H}, opts), right = at::empty({4, N, C}, opts);
  if (N > 0) MMATTN_PSA_DISPATCH_ACC(opts.dtype().toScalarType(), "psa_release_p_bwd_glue", [&] {
    glue_launch(release_p_bwd_glue_kernel<scalar_t>, N, C, sizeof(scalar_t),
                part_wt.data_ptr<scalar_t>(), part_da.data_ptr<scalar_t>(),
                part_du.data_ptr<scalar_t>(), part_r.data_ptr<scalar_t>(),
                static_cast<int>(part_da.size(1)), stats.data_ptr<scalar_t>(),
                small.data_ptr<scalar_t>(), static_cast<int>(N), static_cast<int>(C),
                static_cast<int>(P), release_p_chain<scalar_t>(W), beta_t.data_ptr<scalar_t>(),
                dm.data_ptr<scalar_t>(), dsv.data_ptr<scalar_t>(), beta.data_ptr<scalar_t>(),
                left.data_ptr<scalar_t>(), right.data_ptr<scalar_t>());
  });
  // S and dL/dt = w_t - beta_t sig formed per pixel from t by the apply pass; in the same
  // launch the weight matrices' gradients (4, H, C), conv_up's (2) C x H
  const at::Tensor mats = at::empty({4, H, C}, opts);
  at::Tensor dx = std::get<0>(bwd_apply(grad, x, a, at::Tensor(), logits, lnorm, w_t, stats[3],
                                        dm, dsv, W[0], beta, 0, false, gwq, at::Tensor(),
                                        spatial, beta_t, OuterSumsTail{left, right, mats, 2}));
  return {dx, {gwq, mats[3], mats[2].view({C, H}), mats[1], mats[0]}};
}

}  // namespace MMATTN_PSA_UNIT
}  // namespace psa
}  // namespace mmattn
