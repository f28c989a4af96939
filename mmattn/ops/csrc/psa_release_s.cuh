// The authors' PSA_s (DeLightCMU/PSA; mmattn.layers.PolarizedSelfAttention, variant='official',
// mode='sequential', the form of the released HRNet-OCR weights) as CUDA kernels: the channel
// branch on the paper form's reduction (psa_kernels.cuh), the C-sized chain in two glue kernels
// (a thread block per image), and the spatial branch's per-pixel (C/2 x C) product in passes
// over x that never store the (N, C/2, H, W) value map. Composed into a block's forward and
// backward in psa_block_cuda.cuh.
//
// Per image (x[c][p], C channels, P pixels, H = C/2, Cb bottleneck channels; weights as
// matrices: wq = conv_q_right, W_v = conv_v_right, W_1/b_1, LN (w, b), W_2/b_2 = conv_up,
// W_q' = conv_q_left, W_v' = conv_v_left):
//   channel: l_p = wq . x_p, pi = softmax_p(l), s = sum_p pi_p x_p, v = W_v s,
//            h2 = LN_Cb(W_1 v + b_1) w + b, A = sigmoid(W_2 relu(h2) + b_2)
//   spatial: m = mean_p x_p, mz = A (.) m, q = W_q' mz,
//            Vl[k][p] = sum_c W_v'[k][c] A_c x[c][p], V = softmax_p(Vl) (per k),
//            t_p = q . V_p, S_p = sigmoid(t_p);   y = x A S
// Forward, 4 launches: the reduction (l's online softmax, s, m); the glue (A, q); the value
// reduction (per k, the online softmax state of Vl over the pixels, per split of the pixels);
// the apply pass (merging the splits' states, then Vl again, V, t, S, y). Backward, with the
// forward's small state: the backward reduction
// (dt = dL/dt, dA's direct part sum_p G x S, dq = sum_p V dt); the value pass (dVl =
// V q (dt - dq); W_v''s gradient sum_n A (.) sum_p dVl x^T with atomic adds; e = W_v'^T dVl:
// dx's part A e and dA's part sum_p x e); the glue (the chain's derivative, the other weights'
// gradients with atomic adds); the paper form's backward apply pass (dx's other terms).
//
// The value products run on CUDA cores, a thread per (k, p) of a tile of pixels (W_v' read
// through the cache, the tile from shared memory): tensor cores would be the next step.
//
// Needs psa_kernels.cuh and psa_glue.cuh, and the launch interface (cuda_launch.cuh, or the
// tests' CPU emulation, which provides atomicAdd).
#pragma once

#include <tuple>
#include <vector>

#include "psa_block.h"
#include "psa_glue.cuh"
#include "psa_kernels.cuh"

namespace mmattn {
namespace psa {

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
// Image n: stats (4, N, C) = [s, m, A, mz], small (2, N, H) = [v, q], bott (3, N, Cb) =
// [zhat, h2, relu(h2)] (the bottleneck), rstd (N) (its LayerNorm's); pi (N, P).
template <typename T>
__global__ void __launch_bounds__(kThreads, 1)
release_s_fwd_glue_kernel(const T* __restrict__ logits, const T* __restrict__ pmax,
                          const T* __restrict__ psum, const T* __restrict__ ps,
                          const T* __restrict__ pm, int N, int S, int C, int P, ReleaseS<T> w,
                          T eps, T* __restrict__ pi, T* __restrict__ stats,
                          T* __restrict__ small, T* __restrict__ bott, T* __restrict__ rstd) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* scratch = reinterpret_cast<T*>(smem_raw);
  const int n = blockIdx.x, H = C / 2, Cb = w.Cb;
  auto row = [&](int k) { return stats + (static_cast<int64_t>(k) * N + n) * C; };
  auto brow = [&](int k) { return bott + (static_cast<int64_t>(k) * N + n) * Cb; };
  T *s = row(0), *m = row(1), *a = row(2), *mz = row(3);
  T* v = small + static_cast<int64_t>(n) * H;
  T* q = small + (static_cast<int64_t>(N) + n) * H;
  T *zhat = brow(0), *h2 = brow(1), *r = brow(2);
  const SoftmaxNorm<T> norm = merge_splits(pmax, psum, ps, pm, n, S, C, P, s, m, scratch);
  rows_dot(w.wv, s, static_cast<const T*>(nullptr), H, C, v);  // v = W_v s
  __syncthreads();
  rows_dot(w.w1, v, w.b1, Cb, H, zhat);                         // h1 = W_1 v + b_1
  __syncthreads();
  // the bottleneck's LayerNorm over its Cb channels, then the affine and the ReLU
  const Moments<T> ln = block_moments(zhat, Cb, eps, scratch);
  for (int j = threadIdx.x; j < Cb; j += kThreads) {
    const T zh = (zhat[j] - ln.mean) * ln.rstd;
    zhat[j] = zh;
    h2[j] = zh * w.lnw[j] + w.lnb[j];
    r[j] = op_max(h2[j], T(0));
  }
  if (threadIdx.x == 0) rstd[n] = ln.rstd;
  __syncthreads();
  rows_dot(w.w2, r, w.b2, C, Cb, a);                            // z = W_2 r + b_2
  __syncthreads();
  for (int c = threadIdx.x; c < C; c += kThreads) {
    a[c] = op_sigmoid(a[c]);                                    // A = sigmoid(z)
    mz[c] = a[c] * m[c];
  }
  __syncthreads();
  rows_dot(w.wq2, mz, static_cast<const T*>(nullptr), H, C, q);  // q = W_q' (A m)
  write_pi(logits, n, P, norm, pi);
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

// out[i][j] += u[i] v[j] for i < rows, j < cols (row-major), with atomic adds: the images'
// blocks add into the same gradient.
template <typename T>
__device__ __forceinline__ void add_outer(T* out, const T* u, const T* v, int rows, int cols) {
  for (int i = threadIdx.x; i < rows * cols; i += kThreads)
    atomicAdd(out + i, u[i / cols] * v[i % cols]);
}

// Image n. In: the splits' partial dA sums (pda: sum_p G x S, S splits; pdae: sum_p x e, Se
// splits), dq (N, H), the forward's state. Out: dm = dL/dm / P, ds = dL/ds (N, C),
// beta = ds . s (N), for the backward apply pass; the weights' gradients (but wq's and W_v''s)
// added into `grads` (release_s_grads' layout, zeroed before). dz (N, C), dh1, dh2 (N, Cb),
// dv (N, H): workspace.
template <typename T>
__global__ void __launch_bounds__(kThreads, 1)
release_s_bwd_glue_kernel(const T* __restrict__ pda, int S, const T* __restrict__ pdae,
                          int Se, const T* __restrict__ dq, const T* __restrict__ stats,
                          const T* __restrict__ small, const T* __restrict__ bott,
                          const T* __restrict__ rstd, int N, int C, int P, ReleaseS<T> w,
                          T* __restrict__ dm, T* __restrict__ dsv, T* __restrict__ beta,
                          T* __restrict__ dz, T* __restrict__ dh1, T* __restrict__ dh2,
                          T* __restrict__ dv, T* __restrict__ grads) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* scratch = reinterpret_cast<T*>(smem_raw);
  const int n = blockIdx.x, H = C / 2, Cb = w.Cb;
  const ReleaseSGrads off = release_s_grads(C, Cb);
  auto row = [&](int k) { return stats + (static_cast<int64_t>(k) * N + n) * C; };
  auto brow = [&](int k) { return bott + (static_cast<int64_t>(k) * N + n) * Cb; };
  const T *s = row(0), *m = row(1), *a = row(2), *mz = row(3);
  const T *zhat = brow(0), *h2 = brow(1), *r = brow(2);
  const T* v = small + static_cast<int64_t>(n) * H;
  const T* dqn = dq + static_cast<int64_t>(n) * H;
  T* dzn = dz + static_cast<int64_t>(n) * C;
  T* dmn = dm + static_cast<int64_t>(n) * C;
  T* dh1n = dh1 + static_cast<int64_t>(n) * Cb;
  T* dh2n = dh2 + static_cast<int64_t>(n) * Cb;
  T* dvn = dv + static_cast<int64_t>(n) * H;
  T* dsn = dsv + static_cast<int64_t>(n) * C;

  // q = W_q' mz, mz = A (.) m: dW_q' += dq mz^T, dmz = W_q'^T dq, dm = dmz A, dA += dmz m
  add_outer(grads + off.wq2, dqn, mz, H, C);
  cols_dot(w.wq2, dqn, H, C, dmn);  // dmz, in dm's row until scaled below
  // dA = sum_p G x S (pda's splits) + sum_p x e (pdae's) + dmz m, the two sums first in dz's
  // and ds's rows (ds is written last)
  sum_splits<1>(n, S, C, Unweighted{}, scratch + kWarps, pda, dzn);
  sum_splits<1>(n, Se, C, Unweighted{}, scratch + kWarps, pdae, dsn);
  for (int c = threadIdx.x; c < C; c += kThreads) {
    const T dmz = dmn[c];
    const T da = dzn[c] + dsn[c] + dmz * m[c];
    dmn[c] = dmz * a[c] / P;
    dzn[c] = da * a[c] * (T(1) - a[c]);  // A = sigmoid(z)
    atomicAdd(grads + off.b2 + c, dzn[c]);
  }
  __syncthreads();
  // z = W_2 relu(h2) + b_2: dW_2 += dz relu(h2)^T, dr = W_2^T dz, dh2 = dr [h2 > 0]
  add_outer(grads + off.w2, dzn, r, C, Cb);
  cols_dot(w.w2, dzn, C, Cb, dh2n);
  T part1 = 0, part2 = 0;
  for (int j = threadIdx.x; j < Cb; j += kThreads) {
    const T d = h2[j] > T(0) ? dh2n[j] : T(0);
    dh2n[j] = d;
    atomicAdd(grads + off.lnw + j, d * zhat[j]);
    atomicAdd(grads + off.lnb + j, d);
    const T dzh = d * w.lnw[j];
    part1 += dzh;
    part2 += dzh * zhat[j];
  }
  // h2 = LN(h1) w + b: dh1 = rstd (dzhat - mean(dzhat) - zhat mean(dzhat zhat))
  const T mean1 = block_sum(part1, scratch) / Cb;
  const T mean2 = block_sum(part2, scratch) / Cb;
  for (int j = threadIdx.x; j < Cb; j += kThreads) {
    dh1n[j] = rstd[n] * (dh2n[j] * w.lnw[j] - mean1 - zhat[j] * mean2);
    atomicAdd(grads + off.b1 + j, dh1n[j]);
  }
  __syncthreads();
  // h1 = W_1 v + b_1: dW_1 += dh1 v^T, dv = W_1^T dh1
  add_outer(grads + off.w1, dh1n, v, Cb, H);
  cols_dot(w.w1, dh1n, Cb, H, dvn);
  __syncthreads();
  // v = W_v s: dW_v += dv s^T, ds = W_v^T dv
  add_outer(grads + off.wv, dvn, s, H, C);
  cols_dot(w.wv, dvn, H, C, dsn);
  T part = 0;
  for (int c = threadIdx.x; c < C; c += kThreads) part += dsn[c] * s[c];
  const T b = block_sum(part, scratch);
  if (threadIdx.x == 0) beta[n] = b;
}

// ---------------------------------------------------------------- the value map, per tile
// The tile's (k, p) pairs, k < H value channels, p < tile_p pixels, in rounds of kThreads:
// pair idx = threadIdx.x + round * kThreads is (idx / tile_p, idx % tile_p), so a thread keeps
// its pixel in every round (kThreads is a multiple of tile_p) and the tile_p lanes of a k are
// consecutive lanes of one warp (tile_p divides 32). Every thread runs every round (past the
// last pair with `valid` false), so that the segment reductions below can shuffle.
__host__ __device__ inline int value_rounds(int rows, int tile_p) {
  return (rows * tile_p + kThreads - 1) / kThreads;
}

// Vl[k][p] = sum_c W_v'[k][c] (A (.) x)[c][p] from a tile scaled by A (scale_tile: one product
// and two loads per term), or, kRawTile, from the raw tile and s_a (A), A applied per term (the
// same products in the same order).
template <bool kRawTile = false, typename T>
__device__ __forceinline__ T value_logit(const T* tile, int ld, int C, const T* wv2, int k,
                                         int p, const T* s_a = nullptr) {
  const T* wk = wv2 + static_cast<int64_t>(k) * C;
  const T* xp = tile + p * ld;
  T acc = 0;
  for (int c = 0; c < C; ++c) {
    if constexpr (kRawTile)
      acc += wk[c] * (s_a[c] * xp[c]);
    else
      acc += wk[c] * xp[c];
  }
  return acc;
}

// tile[p][c] *= A_c for the tile's tp pixels, then a barrier: the value logits' A (.) x once
// per element instead of once per value channel.
template <typename T>
__device__ __forceinline__ void scale_tile(T* tile, int ld, int C, int tp, const T* s_a) {
  for (int i = threadIdx.x; i < tp * C; i += kThreads) {
    const int pp = i / C, c = i - pp * C;
    tile[pp * ld + c] *= s_a[c];
  }
  __syncthreads();
}

// The reduction of v over the tile_p lanes of one k (xor shuffles within the segment).
template <typename T, typename Op>
__device__ __forceinline__ T segment_reduce(T v, int tile_p, Op op) {
  for (int o = tile_p / 2; o > 0; o >>= 1) v = op(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

template <typename T>
__device__ __forceinline__ T add(T a, T b) { return a + b; }

template <typename T>
__device__ __forceinline__ T maximum(T a, T b) { return op_max(a, b); }

// ---------------------------------------------------------------- forward, value reduction
// Per split: each value channel's online softmax state over the split's pixels: vmax, vsum
// (N, splits, H).
template <typename scalar_t, typename acc_t, int VEC>
__global__ void __launch_bounds__(kThreads, kMinBlocks)
value_reduce_kernel(const scalar_t* __restrict__ x, Geometry g, int tile_p, int log2_tile,
                    int chunk, int splits, const acc_t* __restrict__ a,
                    const acc_t* __restrict__ wv2, acc_t* __restrict__ vmax,
                    acc_t* __restrict__ vsum) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int ld = g.C + 1, H = g.C / 2;
  acc_t* tile = reinterpret_cast<acc_t*>(smem_raw);
  acc_t* s_a = tile + tile_p * ld;
  acc_t* run_max = s_a + g.C;
  acc_t* run_sum = run_max + H;
  const int n = blockIdx.y, split = blockIdx.x;
  load_vec(s_a, a + static_cast<int64_t>(n) * g.C, g.C);
  for (int k = threadIdx.x; k < H; k += kThreads) {
    run_max[k] = -INFINITY;
    run_sum[k] = 0;
  }
  const int rounds = value_rounds(H, tile_p), p = threadIdx.x % tile_p;
  const int p_begin = split * chunk, p_end = min(g.P, p_begin + chunk);
  for (int pt = p_begin; pt < p_end; pt += tile_p) {
    const int tp = min(tile_p, p_end - pt);
    __syncthreads();
    load_tile<VEC>(g, log2_tile, tp, x + n * g.sN, pt, tile, ld);
    __syncthreads();
    scale_tile(tile, ld, g.C, tp, s_a);
    for (int rd = 0; rd < rounds; ++rd) {
      const int k = (threadIdx.x + rd * kThreads) / tile_p;
      const bool valid = k < H && p < tp;
      const acc_t vl = valid ? value_logit(tile, ld, g.C, wv2, k, p) : -INFINITY;
      // k's state is read and written by its owner lane only (lane p = 0 brings the old
      // maximum into the segment's maximum): no other lane reads what it writes
      const acc_t old = k < H && p == 0 ? run_max[k] : -INFINITY;
      const acc_t new_max = segment_reduce(op_max(vl, old), tile_p, maximum<acc_t>);
      const acc_t e = valid ? op_exp(vl - new_max) : acc_t(0);
      const acc_t total = segment_reduce(e, tile_p, add<acc_t>);
      if (k < H && p == 0) {  // the segment's first lane owns k's state
        run_sum[k] = run_sum[k] * op_exp(old - new_max) + total;
        run_max[k] = new_max;
      }
    }
  }
  __syncthreads();
  const int64_t o = (static_cast<int64_t>(n) * splits + split) * H;
  for (int k = threadIdx.x; k < H; k += kThreads) {
    vmax[o + k] = run_max[k];
    vsum[o + k] = run_sum[k];
  }
}

// Loads the per-image H-vectors q, the value softmax's max and sum into shared memory.
template <typename T>
__device__ __forceinline__ void load_value_state(const T* q, const T* norm, int n, int N, int H,
                                                 T* s_q, T* s_vmax, T* s_vsum) {
  load_vec(s_q, q + static_cast<int64_t>(n) * H, H);
  load_vec(s_vmax, norm + static_cast<int64_t>(n) * H, H);
  load_vec(s_vsum, norm + (static_cast<int64_t>(N) + n) * H, H);
}

// ---------------------------------------------------------------- forward, apply
// y = x A S with S_p = sigmoid(sum_k q_k V[k][p]); S (N, P) kept for the backward. Each block
// merges the value reduction's S split states (vmax, vsum: (N, S, H)) itself; the first
// block of an image writes the merged state, norm (2, N, H) = [max, sum of exponentials], for
// the backward.
template <typename scalar_t, typename acc_t, int VEC>
__global__ void __launch_bounds__(kThreads, kMinBlocks)
value_apply_kernel(const scalar_t* __restrict__ x, scalar_t* __restrict__ y, Geometry g,
                   int tile_p, int log2_tile, const acc_t* __restrict__ a,
                   const acc_t* __restrict__ wv2, const acc_t* __restrict__ q,
                   const acc_t* __restrict__ vmax, const acc_t* __restrict__ vsum, int S,
                   acc_t* __restrict__ norm, acc_t* __restrict__ s_mask) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int ld = g.C + 1, H = g.C / 2, N = gridDim.y;
  acc_t* tile = reinterpret_cast<acc_t*>(smem_raw);
  acc_t* s_a = tile + tile_p * ld;
  acc_t* s_q = s_a + g.C;
  acc_t* s_vmax = s_q + H;
  acc_t* s_vsum = s_vmax + H;
  acc_t* s_part = s_vsum + H;       // kThreads partial logits
  acc_t* s_s = s_part + kThreads;   // the tile's S
  const int n = blockIdx.y;
  const int64_t np = static_cast<int64_t>(n) * g.P;
  load_vec(s_a, a + static_cast<int64_t>(n) * g.C, g.C);
  load_vec(s_q, q + static_cast<int64_t>(n) * H, H);
  for (int k = threadIdx.x; k < H; k += kThreads) {
    const int64_t o = static_cast<int64_t>(n) * S * H + k;
    const SoftmaxNorm<acc_t> merged = merge_states(vmax + o, vsum + o, S, H);
    s_vmax[k] = merged.top;
    s_vsum[k] = merged.total;
    if (blockIdx.x == 0) {
      norm[static_cast<int64_t>(n) * H + k] = merged.top;
      norm[(static_cast<int64_t>(N) + n) * H + k] = merged.total;
    }
  }
  const int rounds = value_rounds(H, tile_p), p = threadIdx.x % tile_p;
  const int tiles = (g.P + tile_p - 1) / tile_p;
  for (int t = blockIdx.x; t < tiles; t += gridDim.x) {
    const int pt = t * tile_p, tp = min(tile_p, g.P - pt);
    __syncthreads();
    load_tile<VEC>(g, log2_tile, tp, x + n * g.sN, pt, tile, ld);
    __syncthreads();
    scale_tile(tile, ld, g.C, tp, s_a);  // A (.) x: the value logits' input and y / S
    acc_t part = 0;
    for (int rd = 0; rd < rounds; ++rd) {
      const int k = (threadIdx.x + rd * kThreads) / tile_p;
      if (k < H && p < tp)
        part += s_q[k] * op_exp(value_logit(tile, ld, g.C, wv2, k, p) - s_vmax[k]) /
                s_vsum[k];
    }
    s_part[threadIdx.x] = part;
    __syncthreads();
    if (threadIdx.x < tp) {  // the partial logits of this pixel: every tile_p-th thread's
      acc_t logit = 0;
      for (int i = threadIdx.x; i < kThreads; i += tile_p) logit += s_part[i];
      const acc_t sg = op_sigmoid(logit);
      s_s[threadIdx.x] = sg;
      s_mask[np + pt + threadIdx.x] = sg;
    }
    __syncthreads();
    tile_loop<VEC>(g, log2_tile, tp, NoLoad{}, [&](int c, int pp, int dc, int dp, int) {
      Pack<scalar_t, VEC> out;
#pragma unroll
      for (int kk = 0; kk < VEC; ++kk) {
        const int ck = c + kk * dc, pk = pp + kk * dp;
        out.v[kk] = static_cast<scalar_t>(tile[pk * ld + ck] * s_s[pk]);
      }
      store_pack(y + n * g.sN + at_cp(g, c, pt + pp), out);
    });
  }
}

// ---------------------------------------------------------------- backward, reduction
// Per split: dt = dL/dt (N, P) with dS_p = sum_c G x A, dt = dS S (1 - S); pda (N, splits, C) =
// sum_p G x S (dA's direct part); pdq (N, splits, H) = sum_p V dt.
template <typename scalar_t, typename acc_t, int VEC>
__global__ void __launch_bounds__(kThreads, kMinBlocks)
value_bwd_reduce_kernel(const scalar_t* __restrict__ grad, const scalar_t* __restrict__ x,
                        Geometry g, int tile_p, int log2_tile, int chunk, int splits,
                        const acc_t* __restrict__ a, const acc_t* __restrict__ s_mask,
                        const acc_t* __restrict__ wv2, const acc_t* __restrict__ q,
                        const acc_t* __restrict__ norm, acc_t* __restrict__ d_t,
                        acc_t* __restrict__ pda, acc_t* __restrict__ pdq,
                        acc_t* __restrict__ zero, int64_t zero_count) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int ld = g.C + 1, H = g.C / 2, N = gridDim.y;
  zero_grid(zero, zero_count);  // the weight gradients' buffer (psa_kernels.cuh)
  acc_t* tile_gx = reinterpret_cast<acc_t*>(smem_raw);  // G (.) x
  acc_t* tile_x = tile_gx + tile_p * ld;
  acc_t* s_s = tile_x + tile_p * ld;
  acc_t* s_dt = s_s + tile_p;
  acc_t* s_a = s_dt + tile_p;
  acc_t* acc_da = s_a + g.C;
  acc_t* s_q = acc_da + g.C;
  acc_t* s_vmax = s_q + H;
  acc_t* s_vsum = s_vmax + H;
  acc_t* acc_dq = s_vsum + H;
  const int n = blockIdx.y, split = blockIdx.x;
  const int64_t base = n * g.sN, np = static_cast<int64_t>(n) * g.P;
  load_vec(s_a, a + static_cast<int64_t>(n) * g.C, g.C);
  load_value_state(q, norm, n, N, H, s_q, s_vmax, s_vsum);
  for (int c = threadIdx.x; c < g.C; c += kThreads) acc_da[c] = 0;
  for (int k = threadIdx.x; k < H; k += kThreads) acc_dq[k] = 0;
  const int rounds = value_rounds(H, tile_p), p = threadIdx.x % tile_p;
  const int p_begin = split * chunk, p_end = min(g.P, p_begin + chunk);
  for (int pt = p_begin; pt < p_end; pt += tile_p) {
    const int tp = min(tile_p, p_end - pt);
    __syncthreads();
    load_tiles_gx<VEC>(g, log2_tile, tp, x + base, grad + base, pt, tile_x, tile_gx, ld);
    if (threadIdx.x < tp) s_s[threadIdx.x] = s_mask[np + pt + threadIdx.x];
    __syncthreads();
    scale_tile(tile_x, ld, g.C, tp, s_a);  // (tile_x serves the value logits only)
    pixel_dots(tile_gx, ld, g.C, tp, s_a, [&](int pp, acc_t ds) {
      const acc_t sg = s_s[pp];
      const acc_t dt = ds * sg * (acc_t(1) - sg);
      s_dt[pp] = dt;
      d_t[np + pt + pp] = dt;
    });
    __syncthreads();
    for (int c = threadIdx.x; c < g.C; c += kThreads) {
      acc_t da = 0;
      for (int pp = 0; pp < tp; ++pp) da += tile_gx[pp * ld + c] * s_s[pp];
      acc_da[c] += da;
    }
    for (int rd = 0; rd < rounds; ++rd) {
      const int k = (threadIdx.x + rd * kThreads) / tile_p;
      const bool valid = k < H && p < tp;
      const acc_t v = valid ? op_exp(value_logit(tile_x, ld, g.C, wv2, k, p) -
                                     s_vmax[k]) / s_vsum[k] * s_dt[p]
                            : acc_t(0);
      const acc_t total = segment_reduce(v, tile_p, add<acc_t>);
      if (k < H && p == 0) acc_dq[k] += total;
    }
  }
  __syncthreads();
  const int64_t o = static_cast<int64_t>(n) * splits + split;
  for (int c = threadIdx.x; c < g.C; c += kThreads) pda[o * g.C + c] = acc_da[c];
  for (int k = threadIdx.x; k < H; k += kThreads) pdq[o * H + k] = acc_dq[k];
}

// ---------------------------------------------------------------- backward, the value map
// dVl[k][p] = V[k][p] q_k (dt_p - dq_k), dq merged from the reduction's pdq (N, dq_splits, H)
// by each block (the first split's also writes it to dq for the glue); out: ex = A (.) W_v'^T
// dVl (x's shape and layout), pdae (N, splits, C) = sum_p x e, and gwv (H, C) += A_c sum_p
// dVl[k][p] x[c][p], W_v''s gradient summed over the images and pixels (atomic adds, in the
// accumulation dtype, into zeros).
template <typename scalar_t, typename acc_t, int VEC>
__global__ void __launch_bounds__(kThreads, kMinBlocks)
value_bwd_map_kernel(const scalar_t* __restrict__ x, scalar_t* __restrict__ ex, Geometry g,
                     int tile_p, int log2_tile, int chunk, int splits,
                     const acc_t* __restrict__ a, const acc_t* __restrict__ wv2,
                     const acc_t* __restrict__ q, const acc_t* __restrict__ norm,
                     const acc_t* __restrict__ d_t, const acc_t* __restrict__ pdq,
                     int dq_splits, acc_t* __restrict__ dq, acc_t* __restrict__ pdae,
                     acc_t* __restrict__ gwv) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int ld = g.C + 1, H = g.C / 2, N = gridDim.y;
  acc_t* tile = reinterpret_cast<acc_t*>(smem_raw);
  acc_t* tile_e = tile + tile_p * ld;
  acc_t* s_dvl = tile_e + tile_p * ld;  // [k][p], tile_p per k
  acc_t* s_a = s_dvl + H * tile_p;
  acc_t* acc_dae = s_a + g.C;
  acc_t* s_q = acc_dae + g.C;
  acc_t* s_vmax = s_q + H;
  acc_t* s_vsum = s_vmax + H;
  acc_t* s_dq = s_vsum + H;
  acc_t* s_dt = s_dq + H;
  const int n = blockIdx.y, split = blockIdx.x;
  const int64_t np = static_cast<int64_t>(n) * g.P;
  load_vec(s_a, a + static_cast<int64_t>(n) * g.C, g.C);
  load_value_state(q, norm, n, N, H, s_q, s_vmax, s_vsum);
  for (int k = threadIdx.x; k < H; k += kThreads) {
    acc_t v = 0;
    for (int s = 0; s < dq_splits; ++s) v += pdq[(static_cast<int64_t>(n) * dq_splits + s) * H + k];
    s_dq[k] = v;
    if (split == 0) dq[static_cast<int64_t>(n) * H + k] = v;
  }
  for (int c = threadIdx.x; c < g.C; c += kThreads) acc_dae[c] = 0;
  const int rounds = value_rounds(H, tile_p), p = threadIdx.x % tile_p;
  const int p_begin = split * chunk, p_end = min(g.P, p_begin + chunk);
  for (int pt = p_begin; pt < p_end; pt += tile_p) {
    const int tp = min(tile_p, p_end - pt);
    __syncthreads();
    load_tile<VEC>(g, log2_tile, tp, x + n * g.sN, pt, tile, ld);
    if (threadIdx.x < tp) s_dt[threadIdx.x] = d_t[np + pt + threadIdx.x];
    __syncthreads();
    for (int rd = 0; rd < rounds; ++rd) {
      const int k = (threadIdx.x + rd * kThreads) / tile_p;
      if (k >= H) continue;
      acc_t dvl = 0;
      if (p < tp) {
        const acc_t v =
            op_exp(value_logit<true>(tile, ld, g.C, wv2, k, p, s_a) - s_vmax[k]) / s_vsum[k];
        dvl = v * s_q[k] * (s_dt[p] - s_dq[k]);
      }
      s_dvl[k * tile_p + p] = dvl;  // 0 past the tile
    }
    __syncthreads();
    // dW_v'[k][c] += A_c sum_p dVl[k][p] x[c][p]: a thread per (k, c), consecutive c in a warp
    for (int i = threadIdx.x; i < H * g.C; i += kThreads) {
      const int k = i / g.C, c = i % g.C;
      acc_t h = 0;
      for (int pp = 0; pp < tp; ++pp) h += s_dvl[k * tile_p + pp] * tile[pp * ld + c];
      atomicAdd(gwv + i, h * s_a[c]);
    }
    // e[c][p] = sum_k W_v'[k][c] dVl[k][p]: a thread per (c, p), the tile_p pixels of a channel
    // on consecutive lanes (every thread runs every round: the segment sum shuffles); sum_p x e
    for (int rd = 0; rd < value_rounds(g.C, tile_p); ++rd) {
      const int i = threadIdx.x + rd * kThreads, c = i / tile_p;
      acc_t e = 0;
      if (c < g.C && p < tp)
        for (int k = 0; k < H; ++k)
          e += wv2[static_cast<int64_t>(k) * g.C + c] * s_dvl[k * tile_p + p];
      if (c < g.C) tile_e[p * ld + c] = e * s_a[c];
      const acc_t xe = segment_reduce(c < g.C && p < tp ? tile[p * ld + c] * e : acc_t(0),
                                      tile_p, add<acc_t>);
      if (c < g.C && p == 0) acc_dae[c] += xe;
    }
    __syncthreads();
    tile_loop<VEC>(g, log2_tile, tp, NoLoad{}, [&](int c, int pp, int dc, int dp, int) {
      Pack<scalar_t, VEC> out;
#pragma unroll
      for (int kk = 0; kk < VEC; ++kk)
        out.v[kk] = static_cast<scalar_t>(tile_e[(pp + kk * dp) * ld + c + kk * dc]);
      store_pack(ex + n * g.sN + at_cp(g, c, pt + pp), out);
    });
  }
  __syncthreads();
  const int64_t o = static_cast<int64_t>(n) * splits + split;
  for (int c = threadIdx.x; c < g.C; c += kThreads) pdae[o * g.C + c] = acc_dae[c];
}

// ---------------------------------------------------------------- host side
// PSA_s's output for x (N, C, H, W, dense in its memory format) and the weights in the
// accumulation dtype (acc_weights of psa_block.h), with what its backward takes: [pi, S, stats,
// small, bott, rstd, norm] (norm (2, N, H): the value softmax's merged state).
std::tuple<at::Tensor, std::vector<at::Tensor>> release_s_forward(
    const at::Tensor& x, const Geometry& g, const std::vector<at::Tensor>& W, double eps) {
  const int N = static_cast<int>(x.size(0)), C = g.C, H = C / 2, P = g.P;
  const int Cb = static_cast<int>(W[3].size(0));
  at::Tensor logits, pmax, psum, ps, pm;  // (not structured bindings: a lambda captures them)
  std::tie(logits, pmax, psum, ps, pm) = fwd_reduce(x, g, W[0], 0);
  const auto opts = logits.options();
  at::Tensor pi = at::empty({N, P}, opts), stats = at::empty({4, N, C}, opts);
  at::Tensor small = at::empty({2, N, H}, opts), bott = at::empty({3, N, Cb}, opts);
  at::Tensor rstd = at::empty({N}, opts), norm = at::empty({2, N, H}, opts);
  at::Tensor s_mask = at::empty({N, P}, opts);
  const at::Tensor y = like_x(at::empty_like(x), x, g, "y");
  if (N == 0) return {y, {pi, s_mask, stats, small, bott, rstd, norm}};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "psa_s_fwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const ReleaseS<acc_t> w = release_s_chain<acc_t>(W);
    launch::launch(release_s_fwd_glue_kernel<acc_t>, dim3(N), kThreads, kGlueSmem * sizeof(acc_t),
                   logits.data_ptr<acc_t>(), pmax.data_ptr<acc_t>(), psum.data_ptr<acc_t>(),
                   ps.data_ptr<acc_t>(), pm.data_ptr<acc_t>(), N,
                   static_cast<int>(pmax.size(1)), C, P, w, static_cast<acc_t>(eps),
                   pi.data_ptr<acc_t>(), stats.data_ptr<acc_t>(), small.data_ptr<acc_t>(),
                   bott.data_ptr<acc_t>(), rstd.data_ptr<acc_t>());
    const acc_t* a = stats[2].data_ptr<acc_t>();
    const Launch lr = plan(C, sizeof(acc_t), 1, 0, 2);
    at::Tensor vmax, vsum;
    with_vectors<scalar_t>(vectorizable<scalar_t>(g, lr, {x.data_ptr()}), [&](auto vec_tag) {
      auto kernel = value_reduce_kernel<scalar_t, acc_t, decltype(vec_tag)::value>;
      const SplitLaunch sl = split(lr, 0, N, P, prepare(kernel, lr));
      vmax = at::empty({N, sl.splits, H}, opts);
      vsum = at::empty({N, sl.splits, H}, opts);
      launch::launch(kernel, dim3(sl.splits, N), kThreads, lr.smem, x.data_ptr<scalar_t>(), g,
                     lr.tile_p, lr.log2_tile, sl.chunk, sl.splits, a, w.wv2,
                     vmax.data_ptr<acc_t>(), vsum.data_ptr<acc_t>());
    });
    const Launch la = plan(C, sizeof(acc_t), 1, 1, 3, kThreads);
    const bool vectors = vectorizable<scalar_t>(g, la, {x.data_ptr(), y.data_ptr()});
    with_vectors<scalar_t>(vectors, [&](auto vec_tag) {
      auto kernel = value_apply_kernel<scalar_t, acc_t, decltype(vec_tag)::value>;
      const int tiles = (P + la.tile_p - 1) / la.tile_p;
      const int grid_x = std::min(tiles, one_wave(prepare(kernel, la), N));
      launch::launch(kernel, dim3(grid_x, N), kThreads, la.smem, x.data_ptr<scalar_t>(),
                     y.data_ptr<scalar_t>(), g, la.tile_p, la.log2_tile, a, w.wv2,
                     small[1].data_ptr<acc_t>(), vmax.data_ptr<acc_t>(),
                     vsum.data_ptr<acc_t>(), static_cast<int>(vmax.size(1)),
                     norm.data_ptr<acc_t>(), s_mask.data_ptr<acc_t>());
    });
  });
  return {y, {pi, s_mask, stats, small, bott, rstd, norm}};
}

// dL/dx and the weights' gradients in the accumulation dtype, in the op's order.
std::tuple<at::Tensor, std::vector<at::Tensor>> release_s_backward(
    const at::Tensor& grad, const at::Tensor& x, const Geometry& g,
    const std::vector<at::Tensor>& saved, const std::vector<at::Tensor>& W) {
  const int N = static_cast<int>(x.size(0)), C = g.C, H = C / 2, P = g.P;
  const int Cb = static_cast<int>(W[3].size(0));
  const at::Tensor &pi = saved[0], &s_mask = saved[1], &stats = saved[2], &small = saved[3],
                   &bott = saved[4], &rstd = saved[5], &norm = saved[6];
  const auto opts = pi.options();
  const at::Tensor a = stats[2], q = small[1];
  at::Tensor d_t = at::empty({N, P}, opts), dq = at::empty({N, H}, opts), pda, pdq, pdae;
  const ReleaseSGrads off = release_s_grads(C, Cb);
  // the atomic adds' target (the weights' gradients, W_q's last), and N x C zeros more: the
  // apply pass's u (PSA_s has no u d_t term); cleared by the first kernel, the reduction
  at::Tensor grads = at::empty({off.total + C + static_cast<int64_t>(N) * C}, opts);
  if (N == 0) grads.zero_();  // (no kernel runs to clear it)
  const at::Tensor ex = like_x(at::empty_like(x), x, g, "ex");
  at::Tensor dm = at::empty({N, C}, opts), dsv = at::empty({N, C}, opts);
  at::Tensor beta = at::empty({N}, opts), dz = at::empty({N, C}, opts);
  at::Tensor dh1 = at::empty({N, Cb}, opts), dh2 = at::empty({N, Cb}, opts);
  at::Tensor dv = at::empty({N, H}, opts);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "psa_s_bwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const ReleaseS<acc_t> w = release_s_chain<acc_t>(W);
    const Launch lr = plan(C, sizeof(acc_t), 2, 2, 4);
    const bool vectors = vectorizable<scalar_t>(g, lr, {x.data_ptr(), grad.data_ptr()});
    with_vectors<scalar_t>(vectors, [&](auto vec_tag) {
      auto kernel = value_bwd_reduce_kernel<scalar_t, acc_t, decltype(vec_tag)::value>;
      const SplitLaunch sl = split(lr, 0, N, P, prepare(kernel, lr));
      pda = at::empty({N, sl.splits, C}, opts);
      pdq = at::empty({N, sl.splits, H}, opts);
      if (N > 0)
        launch::launch(kernel, dim3(sl.splits, N), kThreads, lr.smem,
                       grad.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), g, lr.tile_p,
                       lr.log2_tile, sl.chunk, sl.splits, a.data_ptr<acc_t>(),
                       s_mask.data_ptr<acc_t>(), w.wv2, q.data_ptr<acc_t>(),
                       norm.data_ptr<acc_t>(), d_t.data_ptr<acc_t>(), pda.data_ptr<acc_t>(),
                       pdq.data_ptr<acc_t>(), grads.data_ptr<acc_t>(), grads.numel());
    });
    const Launch lm = plan(C, sizeof(acc_t), 2, 1 + H, 4);
    const bool vec_m = vectorizable<scalar_t>(g, lm, {x.data_ptr(), ex.data_ptr()});
    with_vectors<scalar_t>(vec_m, [&](auto vec_tag) {
      auto kernel = value_bwd_map_kernel<scalar_t, acc_t, decltype(vec_tag)::value>;
      const SplitLaunch sl = split(lm, 0, N, P, prepare(kernel, lm));
      pdae = at::empty({N, sl.splits, C}, opts);
      if (N > 0)
        launch::launch(kernel, dim3(sl.splits, N), kThreads, lm.smem, x.data_ptr<scalar_t>(),
                       ex.data_ptr<scalar_t>(), g, lm.tile_p, lm.log2_tile, sl.chunk,
                       sl.splits, a.data_ptr<acc_t>(), w.wv2, q.data_ptr<acc_t>(),
                       norm.data_ptr<acc_t>(), d_t.data_ptr<acc_t>(), pdq.data_ptr<acc_t>(),
                       static_cast<int>(pdq.size(1)), dq.data_ptr<acc_t>(),
                       pdae.data_ptr<acc_t>(), grads.data_ptr<acc_t>() + off.wv2);
    });
    if (N > 0)
      launch::launch(release_s_bwd_glue_kernel<acc_t>, dim3(N), kThreads,
                     kGlueSmem * sizeof(acc_t), pda.data_ptr<acc_t>(),
                     static_cast<int>(pda.size(1)), pdae.data_ptr<acc_t>(),
                     static_cast<int>(pdae.size(1)), dq.data_ptr<acc_t>(),
                     stats.data_ptr<acc_t>(), small.data_ptr<acc_t>(), bott.data_ptr<acc_t>(),
                     rstd.data_ptr<acc_t>(), N, C, P, w, dm.data_ptr<acc_t>(),
                     dsv.data_ptr<acc_t>(), beta.data_ptr<acc_t>(), dz.data_ptr<acc_t>(),
                     dh1.data_ptr<acc_t>(), dh2.data_ptr<acc_t>(), dv.data_ptr<acc_t>(),
                     grads.data_ptr<acc_t>());
  });
  // dx = G A S + dm + ds pi + wq dl (the paper form's apply pass, with no u dt term) + A e,
  // the apply pass adding into ex
  const at::Tensor gwq = grads.narrow(0, off.total, C);
  const at::Tensor no_u =
      grads.narrow(0, off.total + C, static_cast<int64_t>(N) * C).view({N, C});
  const at::Tensor dx = std::get<0>(
      bwd_apply(grad, x, a, s_mask, pi, d_t, no_u, dm, dsv, W[0], beta, 0, true, gwq, ex));
  std::vector<at::Tensor> out{gwq};
  int64_t start = 0;  // the flat buffer's parts, in the op's order (block_backward shapes them)
  for (const int64_t end : {off.w1, off.b1, off.lnw, off.lnb, off.w2, off.b2, off.wq2, off.wv2,
                            off.total}) {
    out.push_back(grads.slice(0, start, end));
    start = end;
  }
  return {dx, out};
}

}  // namespace psa
}  // namespace mmattn
