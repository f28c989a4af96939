// The authors' PSA_s (DeLightCMU/PSA; mmattn.layers.PolarizedSelfAttention, variant='official',
// mode='sequential', the form of the released HRNet-OCR weights) as CUDA kernels: the channel
// branch on the paper form's reduction (psa_kernels.cuh), the C-sized chain in two glue kernels
// (a team of blocks per image), and the spatial branch's per-pixel (C/2 x C) product as one
// batched GEMM per direction of use (ATen, so tensor cores) into a transient value map that
// the forward drops and the backward recomputes: nothing of size (N, C/2, H, W) is kept.
// Composed into a block's forward and backward in psa_block_cuda.cuh.
//
// Per image (x[c][p], C channels, P pixels, H = C/2, Cb bottleneck channels; weights as
// matrices: wq = conv_q_right, W_v = conv_v_right, W_1/b_1, LN (w, b), W_2/b_2 = conv_up,
// W_q' = conv_q_left, W_v' = conv_v_left):
//   channel: l_p = wq . x_p, pi = softmax_p(l), s = sum_p pi_p x_p, v = W_v s,
//            h2 = LN_Cb(W_1 v + b_1) w + b, A = sigmoid(W_2 relu(h2) + b_2)
//   spatial: m = mean_p x_p, mz = A (.) m, q = W_q' mz,
//            Vl[k][p] = sum_c W_v'[k][c] A_c x[c][p] = (Wa x)[k][p], Wa = W_v' diag(A),
//            V = softmax_p(Vl) (per k), t_p = q . V_p, S_p = sigmoid(t_p);   y = x A S
// Forward, 3 kernels where tensor cores take the value products (x in bf16/fp16, float32 where
// torch.backends.cudnn.allow_tf32 allows TF32; C and P multiples of the 16-byte vector width;
// psa_value_tiles.cuh): the reduction (l's online softmax, s, m); the glue (A, q, and Wa in x's
// dtype); one cooperative launch that computes Vl = Wa x tile by tile where it
// needs it (the value softmax's state per row k, then t from Vl, S, y). Otherwise 4 kernels and
// 1 GEMM: the reduction; the glue; Vl (N, H, P) (a batched GEMM into a transient map); the value
// softmax's state (max and sum of exponentials per row k); the apply pass (t from Vl, S, y).
// Backward, with the forward's small state: the paper form's backward reduction (dt = dL/dt,
// dA's direct part sum_p G x S; on the way it clears the gradients' buffer and writes Wa again);
// where tensor cores take the value products, one cooperative launch (psa_value_tiles.cuh) that
// computes Vl's tiles again, dq_k = sum_p V dt, dVl = V q (dt - dq) (to a transient (N, H, P)
// buffer), dx's part A (.) e = Wa^T dVl (e = W_v'^T dVl) and M = dVl x^T (N, H, C) from the
// buffer; otherwise Vl again (a GEMM); per row k, dq_k and dVl over Vl in place (a kernel); two
// GEMMs, dx's part and M; then, either way, the
// glue (dA's part sum_p x e = sum_k W_v'[k][c] M[k][c] from M, the chain's derivative); the
// paper form's backward apply pass (dx's other terms, added into A (.) e; W_q's gradient, with
// atomic adds), and in the same launch, on blocks of their own, the other weights' gradients
// (sums over the images: of outer products of the chain's vectors, and W_v''s
// sum_n M_n diag(A_n)), a thread per value.
//
// The GEMMs and the value kernels' tile products run in x's dtype (accumulating in float32 for
// the half types, as cuBLAS and the reference's 1x1 convolutions do); everything else in the
// accumulation dtype.
//
// Needs psa_kernels.cuh and psa_glue.cuh, and the launch interface (cuda_launch.cuh, or the
// tests' CPU emulation, which provides atomicAdd).
#pragma once

#include <tuple>
#include <vector>

#include <ATen/ops/bmm.h>

#include "psa_block.h"
#include "psa_dispatch.h"
#include "psa_glue.cuh"
#include "psa_kernels.cuh"
#include "psa_value_tiles.cuh"

namespace mmattn {
namespace psa {
inline namespace MMATTN_PSA_UNIT {

template <typename T>
struct ReleaseS {
  const T *wv, *w1, *b1, *lnw, *lnb, *w2, *b2, *wq2, *wv2;
  int Cb;
};

template <typename T>
ReleaseS<T> release_s_chain(const std::vector<at::Tensor>& W) {
  return {W[1].data_ptr<T>(), W[2].data_ptr<T>(), W[3].data_ptr<T>(), W[4].data_ptr<T>(),
          W[5].data_ptr<T>(), W[6].data_ptr<T>(), W[7].data_ptr<T>(), W[8].data_ptr<T>(),
          W[9].data_ptr<T>(), static_cast<int>(W[3].size(0))};
}

// ---------------------------------------------------------------- glue, forward
// The two factors of a product (what batched_walk loads for an element).
template <typename T>
struct Factors {
  T a, b;
};

// Image n: stats (4, N, C) = [s, m, A, mz], small (2, N, H) = [v, q], bott (3, N, Cb) =
// [zhat, h2, relu(h2)] (the bottleneck), rstd (N) (its LayerNorm's); lnorm (2, N), the state
// of pi = softmax_p(l); wa (N, H, C) = W_v' diag(A), the value GEMM's weight, in x's dtype WT.
template <typename T, typename WT>
__global__ void __launch_bounds__(kGlueThreads, 1)
release_s_fwd_glue_kernel(int blocks, const T* __restrict__ pmax, const T* __restrict__ psum,
                          const T* __restrict__ ps, const T* __restrict__ pm, int N, int S,
                          int C, int P, ReleaseS<T> w, T eps, T* __restrict__ lnorm,
                          T* __restrict__ stats, T* __restrict__ small, T* __restrict__ bott,
                          T* __restrict__ rstd, WT* __restrict__ wa) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* scratch = glue_scratch<T>(smem_raw);
  const Team team(blocks);
  const int n = team.n, H = C / 2, Cb = w.Cb;
  auto row = [&](int k) { return stats + (static_cast<int64_t>(k) * N + n) * C; };
  auto brow = [&](int k) { return bott + (static_cast<int64_t>(k) * N + n) * Cb; };
  T *s = row(0), *m = row(1), *a = row(2), *mz = row(3);
  T* v = small + static_cast<int64_t>(n) * H;
  T* q = small + (static_cast<int64_t>(N) + n) * H;
  T *zhat = brow(0), *h2 = brow(1), *r = brow(2);
  write_norm(merge_splits(team, pmax, psum, ps, pm, S, C, P, s, m, scratch), team, lnorm);
  rows_dot(team, w.wv, s, static_cast<const T*>(nullptr), H, C, v);  // v = W_v s
  team.sync();
  rows_dot(team, w.w1, v, w.b1, Cb, H, zhat);                         // h1 = W_1 v + b_1
  team.sync();
  // the bottleneck's LayerNorm over its Cb channels, then the affine and the ReLU
  const Moments<T> ln = block_moments(zhat, Cb, eps, scratch);
  team.sync_blocks();  // (every block has read h1)
  team.each(Cb, [&](int j) {
    const T zh = (zhat[j] - ln.mean) * ln.rstd;
    zhat[j] = zh;
    h2[j] = zh * w.lnw[j] + w.lnb[j];
    r[j] = op_max(h2[j], T(0));
  });
  if (team.lead()) rstd[n] = ln.rstd;
  team.sync();
  rows_dot(team, w.w2, r, w.b2, C, Cb, a);                            // z = W_2 r + b_2
  __syncthreads();  // (the block's rows of z)
  team.each(C, [&](int c) {
    a[c] = op_sigmoid(a[c]);                                          // A = sigmoid(z)
    mz[c] = a[c] * m[c];
  });
  team.sync();
  rows_dot(team, w.wq2, mz, static_cast<const T*>(nullptr), H, C, q);  // q = W_q' (A m)
  WT* wan = wa + static_cast<int64_t>(n) * H * C;
  const Span rows = team.share(H);  // the block's rows of W_v' diag(A)
  batched_walk(
      static_cast<int64_t>(rows.begin) * C, static_cast<int64_t>(rows.end) * C,
      [&](int64_t i) { return Factors<T>{w.wv2[i], a[i % C]}; },
      [&](int64_t i, const Factors<T>& e) { wan[i] = scaled_weight<WT>(e.a, e.b); });
}

// ---------------------------------------------------------------- glue, backward
// Where the weights' gradients (all but wq's) lie in one flat buffer, in the op's order:
// W_v, W_1, b_1, LN w, LN b, W_2, b_2, W_q', W_v'.
struct ReleaseSGrads {
  int64_t wv, w1, b1, lnw, lnb, w2, b2, wq2, wv2, total;
};

__host__ __device__ inline ReleaseSGrads release_s_grads(int64_t C, int64_t Cb) {
  const int64_t H = C / 2;
  ReleaseSGrads o;
  o.wv = 0;
  o.w1 = o.wv + H * C;
  o.b1 = o.w1 + Cb * H;
  o.lnw = o.b1 + Cb;
  o.lnb = o.lnw + Cb;
  o.w2 = o.lnb + Cb;
  o.b2 = o.w2 + C * Cb;
  o.wq2 = o.b2 + C;
  o.wv2 = o.wq2 + H * C;
  o.total = o.wv2 + H * C;
  return o;
}

// Image n. In: the splits' partial dA sums (pda: sum_p G x S, S splits), the value GEMM's
// M = dVl x^T (N, H, C; x's dtype MT), dq (N, H), the forward's state. Out: dm = dL/dm / P,
// ds = dL/ds (N, C), beta = ds . s (N), for the backward apply pass; the chain's vector
// gradients, from which ReleaseSWeightGrads then forms the weights' (all but wq's):
// dz = dL/dz (N, C), dh2 = dL/dh2 (its ReLU's mask applied), dh1 = dL/dh1 (N, Cb), dv = dL/dv
// (N, H). Only the chain is left here, a chain of matrix-vector products that one block per
// image walks: the weights' gradients, sums over the images of outer products, are as many
// values as the weights and spread over the GPU in those blocks (until 2026-11-26 this block
// added them with atomic adds, 5 matrices' worth a block: 52 us a call in an H100's HRNet-OCR
// step, fp32, its largest PSA kernel).
template <typename T, typename MT>
__global__ void __launch_bounds__(kGlueThreads, 1)
release_s_bwd_glue_kernel(int blocks, const T* __restrict__ pda, int S, const MT* __restrict__ mvx,
                          const T* __restrict__ dq, const T* __restrict__ stats,
                          const T* __restrict__ bott, const T* __restrict__ rstd, int N, int C,
                          int P, ReleaseS<T> w,
                          T* __restrict__ dm, T* __restrict__ dsv, T* __restrict__ beta,
                          T* __restrict__ dz, T* __restrict__ dh1, T* __restrict__ dh2,
                          T* __restrict__ dv) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* scratch = glue_scratch<T>(smem_raw);
  const Team team(blocks);
  const int n = team.n, H = C / 2, Cb = w.Cb;
  auto row = [&](int k) { return stats + (static_cast<int64_t>(k) * N + n) * C; };
  auto brow = [&](int k) { return bott + (static_cast<int64_t>(k) * N + n) * Cb; };
  const T *s = row(0), *m = row(1), *a = row(2);
  const T *zhat = brow(0), *h2 = brow(1);
  const T* dqn = dq + static_cast<int64_t>(n) * H;
  T* dzn = dz + static_cast<int64_t>(n) * C;
  T* dmn = dm + static_cast<int64_t>(n) * C;
  T* dh1n = dh1 + static_cast<int64_t>(n) * Cb;
  T* dh2n = dh2 + static_cast<int64_t>(n) * Cb;
  T* dvn = dv + static_cast<int64_t>(n) * H;
  T* dsn = dsv + static_cast<int64_t>(n) * C;

  // q = W_q' mz, mz = A (.) m: dmz = W_q'^T dq, dm = dmz A, dA += dmz m
  cols_dot(team, w.wq2, dqn, H, C, dmn, scratch);  // dmz, in dm's row until scaled below
  // dA = sum_p G x S (pda's splits) + sum_p x e + dmz m, the two sums first in dz's and ds's
  // rows (ds is written last). With e = W_v'^T dVl and M = dVl x^T: sum_p x e = sum_k
  // W_v'[k][c] M[k][c].
  sum_splits<1>(team, S, C, Unweighted{}, scratch + kGlueWarps, pda, dzn);
  const MT* mn = mvx + static_cast<int64_t>(n) * H * C;
  column_sums(team, H, C, scratch, [&](int k, int c) {
    const int64_t i = static_cast<int64_t>(k) * C + c;
    return w.wv2[i] * static_cast<T>(mn[i]);
  }, dsn);
  team.each(C, [&](int c) {  // (the columns this thread just wrote)
    const T dmz = dmn[c];
    const T da = dzn[c] + dsn[c] + dmz * m[c];
    dmn[c] = dmz * a[c] / P;
    dzn[c] = da * a[c] * (T(1) - a[c]);  // A = sigmoid(z)
  });
  team.sync();
  // z = W_2 relu(h2) + b_2: dr = W_2^T dz, dh2 = dr [h2 > 0]
  cols_dot(team, w.w2, dzn, C, Cb, dh2n, scratch);
  team.each(Cb, [&](int j) {
    if (!(h2[j] > T(0))) dh2n[j] = T(0);
  });
  team.sync();
  // h2 = LN(h1) w + b: dh1 = rstd (dzhat - mean(dzhat) - zhat mean(dzhat zhat))
  T part1 = 0, part2 = 0;
  for (int j = threadIdx.x; j < Cb; j += kGlueThreads) {
    const T dzh = dh2n[j] * w.lnw[j];
    part1 += dzh;
    part2 += dzh * zhat[j];
  }
  const T mean1 = block_sum(part1, scratch) / Cb;
  const T mean2 = block_sum(part2, scratch) / Cb;
  team.each(Cb, [&](int j) {
    dh1n[j] = rstd[n] * (dh2n[j] * w.lnw[j] - mean1 - zhat[j] * mean2);
  });
  team.sync();
  // h1 = W_1 v + b_1: dv = W_1^T dh1
  cols_dot(team, w.w1, dh1n, Cb, H, dvn, scratch);
  team.sync();
  // v = W_v s: ds = W_v^T dv
  cols_dot(team, w.wv, dvn, H, C, dsn, scratch);
  team.sync();
  lead_dot(team, dsn, s, C, scratch, beta + n);
}

// The weights' gradients but wq's, in release_s_grads' layout, from the chain's vectors (the
// glue's dz, dh2, dh1, dv; the forward's s, A, A (.) m, v, the bottleneck's zhat and relu(h2);
// dq; M): each a sum over the images, a thread per value (consecutive threads: consecutive
// columns), N products each, in image order; the backward apply pass's tail (psa_kernels.cuh):
// blocks of their own in its launch.
//   W_v: sum_n dv s^T, W_1: sum_n dh1 v^T, b_1: sum_n dh1, LN w: sum_n dh2 (.) zhat,
//   LN b: sum_n dh2, W_2: sum_n dz relu(h2)^T, b_2: sum_n dz, W_q': sum_n dq (A (.) m)^T,
//   W_v': sum_n M_n diag(A_n) (sum_n sum_p dVl (A (.) x)^T).
template <typename T, typename MT>
struct ReleaseSWeightGrads {
  const MT* mvx;
  const T *dq, *stats, *small, *bott, *dz, *dh1, *dh2, *dv;
  int N, C, Cb;
  T* grads;

  __device__ void operator()(int block, int blocks) const {
    const int64_t H = C / 2, NC = static_cast<int64_t>(N) * C;
    const int64_t NCb = static_cast<int64_t>(N) * Cb;
    const ReleaseSGrads off = release_s_grads(C, Cb);
    const T *s = stats, *a = stats + 2 * NC, *mz = stats + 3 * NC, *v = small, *zhat = bott;
    for (int64_t idx = static_cast<int64_t>(block) * kThreads + threadIdx.x; idx < off.total;
         idx += static_cast<int64_t>(blocks) * kThreads) {
      T g = 0;
      if (idx >= off.wv2) {  // W_v': M in x's dtype
        const int64_t e = idx - off.wv2, c = e % C;
        for (int n = 0; n < N; ++n) g += static_cast<T>(mvx[n * H * C + e]) * a[n * C + c];
      } else {
        // value e of a segment whose rows have `cols` values: sum_n l_n[i] r_n[j] (i, j: e's
        // row and column), or sum_n l_n[i] where r is null (a bias); LN w's elementwise
        // product as a matrix of one column with r offset to the element
        int64_t e, cols = 1, ls, rs = 0;
        const T *l, *r = nullptr;
        if (idx < off.w1) {
          e = idx - off.wv, cols = C, l = dv, ls = H, r = s, rs = C;
        } else if (idx < off.b1) {
          e = idx - off.w1, cols = H, l = dh1, ls = Cb, r = v, rs = H;
        } else if (idx < off.lnw) {
          e = idx - off.b1, l = dh1, ls = Cb;
        } else if (idx < off.lnb) {
          e = idx - off.lnw, l = dh2, ls = Cb, r = zhat + e, rs = Cb;
        } else if (idx < off.w2) {
          e = idx - off.lnb, l = dh2, ls = Cb;
        } else if (idx < off.b2) {
          e = idx - off.w2, cols = Cb, l = dz, ls = C, r = bott + 2 * NCb, rs = Cb;
        } else if (idx < off.wq2) {
          e = idx - off.b2, l = dz, ls = C;
        } else {
          e = idx - off.wq2, cols = C, l = dq, ls = H, r = mz, rs = C;
        }
        const int64_t i = e / cols, j = e - i * cols;
        g = image_sum(l + i, ls, r == nullptr ? r : r + j, rs, N);
      }
      grads[idx] = g;
    }
  }
};

// bwd_apply's tail maker for ReleaseSWeightGrads (M in x's dtype, the rest in the accumulation
// dtype), writing the first release_s_grads(C, Cb).total values of `grads`.
struct ReleaseSWeightGradsTail {
  const at::Tensor &mvx, &dq, &stats, &small, &bott, &dz, &dh1, &dh2, &dv, &grads;
  int N, C, Cb;

  template <typename S>
  ReleaseSWeightGrads<at::opmath_type<S>, S> operator()(S*) const {
    using T = at::opmath_type<S>;
    return {mvx.data_ptr<S>(), dq.data_ptr<T>(), stats.data_ptr<T>(), small.data_ptr<T>(),
            bott.data_ptr<T>(), dz.data_ptr<T>(), dh1.data_ptr<T>(), dh2.data_ptr<T>(),
            dv.data_ptr<T>(), N, C, Cb, grads.data_ptr<T>()};
  }
};

// ---------------------------------------------------------------- the value map
// Vl = W_v' (A (.) x) is, per image n, the product of Wa_n = W_v' diag(A_n) (H x C; the forward
// glue writes it, the backward's first kernel again) with x_n (C x P): one batched GEMM (ATen:
// cuBLAS on tensor cores for half types, and for float32 where
// torch.backends.cuda.matmul.allow_tf32 allows; CPU BLAS in the emulation), written in x's dtype to
// a transient (N, H, P) buffer that the forward drops and the backward recomputes. The kernels
// below read it row by row: the softmax's per-row state, the gate, dq and dVl.

// x (N, C, H, W), dense in its memory format, as N (C x P) matrices: a view (NCHW: rows of
// pixels; channels_last: its transpose, which the GEMMs take as such).
inline at::Tensor channel_matrices(const at::Tensor& x) { return x.flatten(2); }

// ---------------------------------------------------------------- forward, the value softmax
// norm (2, rows) = [max_p Vl[r][p], sum_p exp(Vl[r][p] - max)] for each of Vl's rows r = n H + k
// (N, H, P): a block per row (the grid at most one wave, its blocks looping over the rows),
// each thread an online softmax over its vectors of the row, merged over the block.
template <typename scalar_t, typename acc_t, int VEC>
__global__ void __launch_bounds__(kThreads)
value_stats_kernel(const scalar_t* __restrict__ vl, int64_t rows, int P,
                   acc_t* __restrict__ norm) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  acc_t* scratch = reinterpret_cast<acc_t*>(smem_raw);  // block_merge's 2 kWarps values
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const scalar_t* r = vl + row * P;
    acc_t top = -INFINITY, total = 0;
    for (int i = threadIdx.x * VEC; i < P; i += kThreads * VEC) {
      const Pack<scalar_t, VEC> v = load_pack<VEC>(r + i);
      acc_t m = top;
#pragma unroll
      for (int j = 0; j < VEC; ++j) m = op_max(m, static_cast<acc_t>(v.v[j]));
      acc_t s = total * op_exp(top - m);  // (m is finite: the pack's values are)
#pragma unroll
      for (int j = 0; j < VEC; ++j) s += op_exp(static_cast<acc_t>(v.v[j]) - m);
      top = m;
      total = s;
    }
    const SoftmaxNorm<acc_t> merged = block_merge(top, total, scratch);
    if (threadIdx.x == 0) {
      norm[row] = merged.top;
      norm[rows + row] = merged.total;
    }
  }
}

// ---------------------------------------------------------------- forward, apply
// y = x A S with S_p = sigmoid(t_p), t_p = sum_k q_k exp(Vl[k][p] - max_k) / sum_k; S (N, P)
// kept for the backward. A block takes tiles of tile_p pixels: the logits from Vl, then y from x
// in x's layout (no tile of x is staged: each element is read once, scaled, written).
// The logits: a tile's rows of Vl are read in vectors of VV pixels (16 bytes where the rows
// allow, rows_vectorizable; else single pixels): thread i takes the vector i % (32 / VV) of the
// rows i / (32 / VV), i / (32 / VV) + 8 VV, ... and keeps VV partial sums; the VV lanes of a
// warp with the same vector add theirs in a butterfly whose rounds halve the sums a lane
// carries (pixel_dots' scheme), each warp writes its sums per pixel to shared memory, and a
// thread per pixel adds the warps' in order.
// (Until 2026-11-27 a thread read one element of Vl at a time and divided its pair's index by
// tile_p: in the SASS (sm_90, bf16) 36 instructions an element of Vl, about 9 with vectors.)
// (float64 gets 2 blocks an SM: at 64 registers it spilled 4-8 bytes)
template <typename scalar_t, typename acc_t, int VEC, int VV>
__global__ void __launch_bounds__(kThreads, sizeof(acc_t) == 8 ? 2 : kMinBlocks)
value_apply_kernel(const scalar_t* __restrict__ x, scalar_t* __restrict__ y, Geometry g,
                   int tile_p, int log2_tile, const acc_t* __restrict__ a,
                   const scalar_t* __restrict__ vl, const acc_t* __restrict__ q,
                   const acc_t* __restrict__ norm, acc_t* __restrict__ s_mask) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int H = g.C / 2, N = gridDim.y;
  acc_t* s_a = reinterpret_cast<acc_t*>(smem_raw);
  acc_t* s_qz = s_a + g.C;          // q_k / sum_k
  acc_t* s_vmax = s_qz + H;
  acc_t* s_part = s_vmax + H;       // the warps' partial logits, kWarps x tile_p
  acc_t* s_s = s_part + kThreads;   // the tile's S
  const int n = blockIdx.y;
  const int64_t np = static_cast<int64_t>(n) * g.P, nh = static_cast<int64_t>(n) * H;
  load_vec(s_a, a + static_cast<int64_t>(n) * g.C, g.C);
  for (int k = threadIdx.x; k < H; k += kThreads) {
    s_vmax[k] = norm[nh + k];
    s_qz[k] = q[nh + k] / norm[static_cast<int64_t>(N) * H + nh + k];
  }
  // a warp's lanes: kSlots vectors of VV pixels (32 pixels; those past the tile idle), the
  // lanes of a vector kSlots apart; after halving_butterfly, this lane's sum is of the
  // vector's pixel lane / kSlots
  constexpr int kSlots = 32 / VV;
  const int lane = threadIdx.x & 31, slot = lane % kSlots;
  const int pixel = slot * VV + lane / kSlots;
  const int tiles = (g.P + tile_p - 1) / tile_p;
  for (int t = blockIdx.x; t < tiles; t += gridDim.x) {
    const int pt = t * tile_p, tp = min(tile_p, g.P - pt);
    __syncthreads();  // (s_a, s_qz, s_vmax written; the last tile's s_part, s_s read)
    acc_t part[VV];
#pragma unroll
    for (int i = 0; i < VV; ++i) part[i] = acc_t(0);
    if (slot * VV < tp) {  // (tp: a multiple of VV; the host checks tile_p % VV == 0)
      constexpr int kRowStep = kThreads / kSlots;
      const int k0 = threadIdx.x / kSlots;
      const scalar_t* r = vl + (nh + k0) * g.P + pt + slot * VV;  // row k's vector
      for (int k = k0; k < H; k += kRowStep, r += static_cast<int64_t>(kRowStep) * g.P) {
        const Pack<scalar_t, VV> v = load_pack<VV>(r);
        const acc_t qz = s_qz[k], top = s_vmax[k];
#pragma unroll
        for (int i = 0; i < VV; ++i) part[i] += qz * op_exp(static_cast<acc_t>(v.v[i]) - top);
      }
    }
    halving_butterfly(part, lane);
    if (pixel < tp) s_part[(threadIdx.x >> 5) * tile_p + pixel] = part[0];
    __syncthreads();
    if (threadIdx.x < tp) {  // the warps' partial logits of this pixel, in warp order
      acc_t logit = 0;
      for (int w = 0; w < kWarps; ++w) logit += s_part[w * tile_p + threadIdx.x];
      const acc_t sg = op_sigmoid(logit);
      s_s[threadIdx.x] = sg;
      s_mask[np + pt + threadIdx.x] = sg;
    }
    __syncthreads();
    const scalar_t* xn = x + n * g.sN;
    tile_loop<VEC>(
        g, log2_tile, tp, [&](int c, int pp) { return load_pack<VEC>(xn + at_cp(g, c, pt + pp)); },
        [&](int c, int pp, int dc, int dp, const Pack<scalar_t, VEC>& v) {
          Pack<scalar_t, VEC> out;
#pragma unroll
          for (int kk = 0; kk < VEC; ++kk) {
            const int ck = c + kk * dc, pk = pp + kk * dp;
            out.v[kk] = static_cast<scalar_t>(static_cast<acc_t>(v.v[kk]) * s_a[ck] * s_s[pk]);
          }
          store_pack(y + n * g.sN + at_cp(g, c, pt + pp), out);
        });
  }
}

// ---------------------------------------------------------------- backward, dVl
// For each row r = n H + k of Vl (N, H, P), a block (the grid at most one wave, its blocks
// looping over the rows): dq_k = sum_p V[k][p] dt_p, V = exp(Vl - max_k) / sum_k (written to
// dq (N, H) for the glue), then dVl[k][p] = V[k][p] q_k (dt_p - dq_k) over Vl in place; vectors
// of VEC pixels (P % VEC == 0), dt's too (VEC values of the accumulation type in one or two
// 16-byte loads: where each was a load of its own, a warp's loads of dt took 8 times the
// accesses; Nsight Compute, H100, 2026-11-27: 101 us a call at [16, 256, 128, 128] bf16, its
// memory pipes 91 % busy at 33 % of DRAM's rate). dt = dL/dt (N, P), from the backward
// reduction. (float: 4 blocks an SM, 64 registers, where with 1 block's bound the vectors of
// dt took it to 120 and 2 blocks; float64: 1 block's bound, without which it spilled 8 bytes)
template <typename scalar_t, typename acc_t, int VEC>
__global__ void __launch_bounds__(kThreads, sizeof(acc_t) == 8 ? 1 : kMinBlocks)
value_grad_kernel(scalar_t* __restrict__ vl, int64_t rows, int H, int P,
                  const acc_t* __restrict__ q, const acc_t* __restrict__ norm,
                  const acc_t* __restrict__ d_t, acc_t* __restrict__ dq) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  acc_t* scratch = reinterpret_cast<acc_t*>(smem_raw);  // block_sum's kWarps values
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    scalar_t* r = vl + row * P;
    const acc_t* dtn = d_t + row / H * P;
    const acc_t top = norm[row], total = norm[rows + row];
    acc_t part = 0;
    for (int i = threadIdx.x * VEC; i < P; i += kThreads * VEC) {
      const Pack<scalar_t, VEC> v = load_pack<VEC>(r + i);
      const Pack<acc_t, VEC> dt = load_pack<VEC>(dtn + i);
#pragma unroll
      for (int j = 0; j < VEC; ++j)
        part += op_exp(static_cast<acc_t>(v.v[j]) - top) * dt.v[j];
    }
    const acc_t dqk = block_sum(part, scratch) / total;  // (its first barrier: scratch free)
    if (threadIdx.x == 0) dq[row] = dqk;
    const acc_t qz = q[row] / total;
    for (int i = threadIdx.x * VEC; i < P; i += kThreads * VEC) {
      Pack<scalar_t, VEC> v = load_pack<VEC>(r + i);
      const Pack<acc_t, VEC> dt = load_pack<VEC>(dtn + i);
#pragma unroll
      for (int j = 0; j < VEC; ++j)
        v.v[j] = static_cast<scalar_t>(op_exp(static_cast<acc_t>(v.v[j]) - top) * qz *
                                       (dt.v[j] - dqk));
      store_pack(r + i, v);
    }
  }
}

// ---------------------------------------------------------------- host side
// Vl (N, H, P) in x's dtype for the per-image weight Wa (N, H, C): the value GEMM.
inline at::Tensor value_logits(const at::Tensor& wa, const at::Tensor& x) {
  return at::bmm(wa, channel_matrices(x));
}

// M = dVl x^T (N, H, C), per image a product whose reduction runs over the P pixels into a small
// H x C output. cuBLAS gives such a product a thread block per output tile, so where the tiles
// are few a handful of SMs do all the work: at HRNet-OCR's widest map ([2, 48, 128, 256]: 2 x 1
// x 2 tiles of 32, K = 32768), 0.57 ms in float32 on an H100 (not TF32; 0.10 ms with TF32),
// against 0.12 ms with the pixels cut into chunks, a batched product per image over its chunks
// and their sum (2026-11-26, tools/gpu_check.sh's lease; bf16: 0.05 ms whole, 0.11 ms cut). So
// float32/float64 products with fewer tiles than SMs and at least kSplitMinPixels pixels are
// cut into S chunks, S the largest power of two that divides P, keeps chunks of at least
// kSplitMinChunk pixels and N tiles S within two per SM; at least 4 chunks, else none.
constexpr int64_t kSplitMinPixels = 8192, kSplitMinChunk = 256;

inline int64_t value_product_splits(int64_t N, int64_t H, int64_t C, int64_t P,
                                    at::ScalarType dtype) {
  if ((dtype != at::kFloat && dtype != at::kDouble) || P < kSplitMinPixels) return 1;
  const int64_t tiles = N * ((H + 31) / 32) * ((C + 31) / 32);
  const int64_t sms = launch::device_attribute(launch::Attr::kMultiProcessors);
  if (tiles >= sms) return 1;
  int64_t s = 1;
  while (tiles * s * 2 <= 2 * sms && P % (2 * s) == 0 && P / (2 * s) >= kSplitMinChunk) s *= 2;
  return s >= 4 ? s : 1;
}

// M = dVl x^T for dVl (N, H, P) in x's dtype (dense) and x (N, C, H, W), in x's dtype: one
// batched GEMM, or (value_product_splits) a batched GEMM per image over the chunks of its
// pixels (views: dVl_n as (S, H, P/S), x_n^T as (S, P/S, C), in either memory format) and the
// chunks' sum.
inline at::Tensor value_products(const at::Tensor& dvl, const at::Tensor& x) {
  const at::Tensor xm = channel_matrices(x);  // (N, C, P)
  const int64_t N = dvl.size(0), H = dvl.size(1), P = dvl.size(2), C = xm.size(1);
  const int64_t S = value_product_splits(N, H, C, P, x.scalar_type());
  if (S == 1) return at::bmm(dvl, xm.transpose(1, 2));
  const int64_t chunk = P / S;
  const at::Tensor parts = at::empty({N, S, H, C}, dvl.options());
  for (int64_t n = 0; n < N; ++n) {
    at::Tensor out = parts[n];
    at::bmm_out(out, dvl[n].view({H, S, chunk}).transpose(0, 1),
                xm[n].view({C, S, chunk}).permute({1, 2, 0}));
  }
  return parts.sum(1);
}

// Whether the kernels that walk Vl's rows can move 16-byte vectors of them.
template <typename scalar_t>
bool rows_vectorizable(const at::Tensor& vl, int P) {
  return P % kPack16<scalar_t> == 0 && is_aligned(vl.data_ptr(), 16);
}

// PSA_s's output for x (N, C, H, W, dense in its memory format) and the weights in the
// accumulation dtype (acc_weights of psa_block.h), with what its backward takes: [logits, S,
// stats, small, bott, rstd, norm, lnorm] (norm (2, N, H): the value softmax's state, max and
// sum per row; lnorm (2, N): the channel softmax's).
std::tuple<at::Tensor, std::vector<at::Tensor>> release_s_forward(
    const at::Tensor& x, const Geometry& g, const std::vector<at::Tensor>& W, double eps) {
  const int N = static_cast<int>(x.size(0)), C = g.C, H = C / 2, P = g.P;
  const int Cb = static_cast<int>(W[3].size(0));
  at::Tensor logits, pmax, psum, ps, pm;  // (not structured bindings: a lambda captures them)
  std::tie(logits, pmax, psum, ps, pm) = fwd_reduce(x, g, W[0], 0);
  const auto opts = logits.options();
  at::Tensor lnorm = at::empty({2, N}, opts), stats = at::empty({4, N, C}, opts);
  at::Tensor small = at::empty({2, N, H}, opts), bott = at::empty({3, N, Cb}, opts);
  at::Tensor rstd = at::empty({N}, opts), norm = at::empty({2, N, H}, opts);
  at::Tensor s_mask = at::empty({N, P}, opts), wa = at::empty({N, H, C}, x.options());
  const at::Tensor y = like_x(at::empty_like(x), x, g, "y");
  if (N == 0) return {y, {logits, s_mask, stats, small, bott, rstd, norm, lnorm}};
  MMATTN_PSA_DISPATCH(x.scalar_type(), "psa_s_fwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const ReleaseS<acc_t> w = release_s_chain<acc_t>(W);
    glue_launch(release_s_fwd_glue_kernel<acc_t, scalar_t>, N, C, sizeof(acc_t),
                pmax.data_ptr<acc_t>(), psum.data_ptr<acc_t>(), ps.data_ptr<acc_t>(),
                pm.data_ptr<acc_t>(), N, static_cast<int>(pmax.size(1)), C, P, w,
                static_cast<acc_t>(eps), lnorm.data_ptr<acc_t>(), stats.data_ptr<acc_t>(),
                small.data_ptr<acc_t>(), bott.data_ptr<acc_t>(), rstd.data_ptr<acc_t>(),
                wa.data_ptr<scalar_t>());
    const at::Tensor a = stats[2];
    // the value map in the kernel's own tiles, in one cooperative launch, where it runs
    if (value_forward<scalar_t, acc_t>(x, g, wa, a, small[1], y, norm, s_mask)) return;
    const at::Tensor vl = value_logits(wa, x);
    with_vectors<scalar_t>(rows_vectorizable<scalar_t>(vl, P), [&](auto vec_tag) {
      auto kernel = value_stats_kernel<scalar_t, acc_t, decltype(vec_tag)::value>;
      const int64_t rows = static_cast<int64_t>(N) * H;
      const size_t smem = 2 * kWarps * sizeof(acc_t);
      launch::launch(kernel, dim3(wave_blocks(kernel, rows, smem)), kThreads, smem,
                     vl.data_ptr<scalar_t>(), rows, P, norm.data_ptr<acc_t>());
    });
    const Launch la = plan(C, sizeof(acc_t), 0, 1, 2, kThreads);
    const bool vectors = vectorizable<scalar_t>(g, la, {x.data_ptr(), y.data_ptr()});
    // Vl's rows in 16-byte vectors: whole vectors in a tile's part of a row
    const bool vl_vectors =
        rows_vectorizable<scalar_t>(vl, P) && la.tile_p % kPack16<scalar_t> == 0;
    with_vectors<scalar_t>(vectors, [&](auto vec_tag) {
      with_vectors<scalar_t>(vl_vectors, [&](auto vl_tag) {
        auto kernel = value_apply_kernel<scalar_t, acc_t, decltype(vec_tag)::value,
                                         decltype(vl_tag)::value>;
        const int tiles = (P + la.tile_p - 1) / la.tile_p;
        const int grid_x = std::min(tiles, one_wave(prepare(kernel, la), N));
        launch::launch(kernel, dim3(grid_x, N), kThreads, la.smem, x.data_ptr<scalar_t>(),
                       y.data_ptr<scalar_t>(), g, la.tile_p, la.log2_tile, a.data_ptr<acc_t>(),
                       vl.data_ptr<scalar_t>(), small[1].data_ptr<acc_t>(),
                       norm.data_ptr<acc_t>(), s_mask.data_ptr<acc_t>());
      });
    });
  });
  return {y, {logits, s_mask, stats, small, bott, rstd, norm, lnorm}};
}

// dL/dx and the weights' gradients in the accumulation dtype, in the op's order.
std::tuple<at::Tensor, std::vector<at::Tensor>> release_s_backward(
    const at::Tensor& grad, const at::Tensor& x, const Geometry& g,
    const std::vector<at::Tensor>& saved, const std::vector<at::Tensor>& W) {
  const int N = static_cast<int>(x.size(0)), C = g.C, H = C / 2, P = g.P;
  const int Cb = static_cast<int>(W[3].size(0));
  const at::Tensor &logits = saved[0], &s_mask = saved[1], &stats = saved[2],
                   &small = saved[3], &bott = saved[4], &rstd = saved[5], &norm = saved[6],
                   &lnorm = saved[7];
  const auto opts = logits.options();
  const at::Tensor a = stats[2], q = small[1];
  const ReleaseSGrads off = release_s_grads(C, Cb);
  // the weights' gradients (W_q's last: the apply pass's atomic adds' target), and N x C zeros
  // more: the apply pass's u (PSA_s has no u d_t term); cleared by the first kernel, the
  // reduction
  const at::Tensor grads = at::empty({off.total + C + static_cast<int64_t>(N) * C}, opts);
  // dt = dL/dt (S = sigmoid(t)) and dA's direct part sum_p G x S: the paper form's sequential
  // backward reduction, which also clears `grads` and writes the value GEMM's weight Wa
  const at::Tensor wa = at::empty({N, H, C}, x.options());
  at::Tensor d_t, pda;  // (not structured bindings: a lambda captures them)
  std::tie(d_t, pda, std::ignore, std::ignore, std::ignore) =
      bwd_reduce(grad, x, a, s_mask, SoftmaxStates{}, 0, true, grads, W[9], wa);
  const at::Tensor ex = like_x(at::empty_like(x), x, g, "ex");
  at::Tensor dq = at::empty({N, H}, opts), dm = at::empty({N, C}, opts);
  at::Tensor dsv = at::empty({N, C}, opts), beta = at::empty({N}, opts);
  at::Tensor dz = at::empty({N, C}, opts), dh1 = at::empty({N, Cb}, opts);
  at::Tensor dh2 = at::empty({N, Cb}, opts), dv = at::empty({N, H}, opts);
  at::Tensor m;  // M = dVl x^T (N, H, C), in x's dtype
  MMATTN_PSA_DISPATCH(x.scalar_type(), "psa_s_bwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const ReleaseS<acc_t> w = release_s_chain<acc_t>(W);
    // dq, dx's part A (.) e = Wa^T dVl (e = W_v'^T dVl, in x's layout) and M = dVl x^T
    // (N, H, C, in x's dtype), from which the glue forms W_v''s gradient sum_n M_n diag(A_n)
    // and dA's part sum_p x e = sum_k W_v'[k][c] M[k][c]: in one cooperative launch that
    // computes the map's tiles itself where it runs (M after it with MMATTN_PSA_FUSED_M=0)
    at::Tensor vl = value_backward<scalar_t, acc_t>(x, g, wa, q, norm, d_t, dq, ex, &m);
    if (!vl.defined()) {
      vl = value_logits(wa, x);  // again: the forward keeps none of it
      if (N > 0)
        with_vectors<scalar_t>(rows_vectorizable<scalar_t>(vl, P), [&](auto vec_tag) {
          auto kernel = value_grad_kernel<scalar_t, acc_t, decltype(vec_tag)::value>;
          const int64_t rows = static_cast<int64_t>(N) * H;
          const size_t smem = kWarps * sizeof(acc_t);
          launch::launch(kernel, dim3(wave_blocks(kernel, rows, smem)), kThreads, smem,
                         vl.data_ptr<scalar_t>(), rows, H, P, q.data_ptr<acc_t>(),
                         norm.data_ptr<acc_t>(), d_t.data_ptr<acc_t>(), dq.data_ptr<acc_t>());
        });
      // vl now holds dVl
      at::Tensor ex_rows = channel_matrices(ex);
      at::bmm_out(ex_rows, wa.transpose(1, 2), vl);
    }
    if (!m.defined()) m = value_products(vl, x);  // (vl holds dVl)
    if (N > 0)
      glue_launch(release_s_bwd_glue_kernel<acc_t, scalar_t>, N, C, sizeof(acc_t),
                  pda.data_ptr<acc_t>(), static_cast<int>(pda.size(1)), m.data_ptr<scalar_t>(),
                  dq.data_ptr<acc_t>(), stats.data_ptr<acc_t>(), bott.data_ptr<acc_t>(),
                  rstd.data_ptr<acc_t>(), N, C, P, w,
                  dm.data_ptr<acc_t>(), dsv.data_ptr<acc_t>(), beta.data_ptr<acc_t>(),
                  dz.data_ptr<acc_t>(), dh1.data_ptr<acc_t>(), dh2.data_ptr<acc_t>(),
                  dv.data_ptr<acc_t>());
  });
  // dx = G A S + dm + ds pi + wq dl (the paper form's apply pass, with no u dt term) + A e,
  // the apply pass adding into ex
  const at::Tensor gwq = grads.narrow(0, off.total, C);
  const at::Tensor no_u =
      grads.narrow(0, off.total + C, static_cast<int64_t>(N) * C).view({N, C});
  const at::Tensor dx = std::get<0>(bwd_apply(
      grad, x, a, s_mask, logits, lnorm, d_t, no_u, dm, dsv, W[0], beta, 0, true, gwq, ex,
      SoftmaxStates{}, at::Tensor(),
      ReleaseSWeightGradsTail{m, dq, stats, small, bott, dz, dh1, dh2, dv, grads, N, C, Cb}));
  std::vector<at::Tensor> out{gwq};
  int64_t start = 0;  // the flat buffer's parts, in the op's order (block_backward shapes them)
  for (const int64_t end : {off.w1, off.b1, off.lnw, off.lnb, off.w2, off.b2, off.wq2, off.wv2,
                            off.total}) {
    out.push_back(grads.slice(0, start, end));
    start = end;
  }
  return {dx, out};
}

}  // namespace MMATTN_PSA_UNIT
}  // namespace psa
}  // namespace mmattn
