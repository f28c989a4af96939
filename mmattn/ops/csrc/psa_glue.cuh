// Polarized Self-Attention, paper form folded (mmattn/ops/psa.py): the C-sized work between
// the passes over x, a team of thread blocks per image (a cluster on compute capability 9.0,
// one block below; Team), as two kernels. Their PyTorch twins are
// `_fwd_glue_torch` / `_bwd_glue_torch` in mmattn/ops/psa.py (same contracts); as PyTorch
// operations they are 30-90 launches per step, which at large shapes would cost more than the
// passes over x themselves.
//
//   forward:  merge the splits' online-softmax states (max M_s, sum Z_s, weighted sums) into
//             the state (M, Z) of pi = softmax_p(l) and s = sum_p pi_p x_p, m = mean_p x_p
//             (pi itself is formed where it is used, by the backward apply pass); then the chain
//             v = W_v s + b_v, z = W_z v + b_z, A = sigmoid(LN(z)), mz = A m | m,
//             q = softmax(W_q mz + b_q), u = W_v'^T q, c = q . b_v', u_eff = u A | u   (Eq. 1-5)
//   backward: the chain again (from s and m), then its derivative in reverse, giving what the
//             last pass needs (dm, ds, beta) and the factors of the parameter gradients.
// Nothing here walks the pixels (a block per image would be latency-bound on them: at N = 2,
// P = 32768, 128 loads a thread): the reductions' per-split sums carry what they need.
//
// All vectors are in the accumulation dtype (float or double); the weights are CHAIN_NAMES of
// psa.py as contiguous matrices: ch_wv (C/2, C), ch_wz (C, C/2), sp_wq and sp_wv (C/2, C).
// Per-image vectors live in global memory (outputs or a workspace): a block's threads write
// and read them between __syncthreads, which orders global memory within the block too.
#pragma once

#include <algorithm>
#include <vector>

#include "psa_dispatch.h"
#include "psa_kernels.cuh"

namespace mmattn {
namespace psa {
inline namespace MMATTN_PSA_UNIT {

// Threads of a glue block. A glue is a few blocks per image with no occupancy goal (at N = 2 and
// a block an image, two blocks on the whole GPU), so its loops run at the latency of its
// loads: Nsight Compute on an H100 ([16, 256, 128, 128]) found 256 threads issuing an
// instruction every 9 cycles per scheduler, 2 warps each, 68 % of the time waiting on L1TEX
// (one block per image, 2026-11-26). 512 threads give each scheduler
// 4 warps and halve every loop a thread runs, within the 128 registers a thread that a
// 512-thread block may use (the float glues use 70-118).
constexpr int kGlueThreads = 512;
constexpr int kGlueWarps = kGlueThreads / 32;

template <typename T>
struct Chain {
  const T *ch_wv, *ch_bv, *ch_wz, *ch_bz, *ln_w, *ln_b, *sp_wq, *sp_bq, *sp_wv, *sp_bv;
};

// Where the chain of one image reads s, m and writes its vectors (C-vectors unless noted).
template <typename T>
struct ChainVecs {
  const T *s, *m;
  T *a, *ueff, *zhat, *mz, *u;
  T *v, *q;      // C/2
  T *rstd, *c;   // one value each
  T *z, *g;      // scratch: z before its LayerNorm (C), q's logits (C/2)
};

template <typename T>
__device__ __forceinline__ T op_rsqrt(T v) { return T(1) / ::sqrt(v); }

// The block-wide reduction of v under op (any block of whole warps: the glues' and the
// 256-thread kernels'); every thread gets the result. `scratch`: a value per warp of shared
// memory.
template <typename T, typename Op>
__device__ __forceinline__ T block_reduce(T v, T* scratch, Op op) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = op(v, __shfl_xor_sync(0xffffffffu, v, o));
  __syncthreads();  // the previous reduction has read scratch
  if ((threadIdx.x & 31) == 0) scratch[threadIdx.x >> 5] = v;
  __syncthreads();
  T r = scratch[0];
  const int warps = static_cast<int>(blockDim.x >> 5);
  for (int w = 1; w < warps; ++w) r = op(r, scratch[w]);
  return r;
}

template <typename T>
__device__ __forceinline__ T block_sum(T v, T* scratch) {
  return block_reduce(v, scratch, [](T x, T y) { return x + y; });
}

template <typename T>
__device__ __forceinline__ T block_max(T v, T* scratch) {
  return block_reduce(v, scratch, [](T x, T y) { return x > y ? x : y; });
}

// The sum of image n's S per-split values (an (N, S) tensor's row n, a backward reduction's
// partial sums); every thread gets it.
template <typename T>
__device__ __forceinline__ T sum_split_values(const T* per_split, int n, int S, T* scratch) {
  T part = 0;
  for (int i = threadIdx.x; i < S; i += kGlueThreads)
    part += per_split[static_cast<int64_t>(n) * S + i];
  return block_sum(part, scratch);
}

// A LayerNorm's statistics of z[0..n): the mean and 1 / sqrt(biased variance + eps); every
// thread gets them.
template <typename T>
struct Moments {
  T mean, rstd;
};

template <typename T>
__device__ __forceinline__ Moments<T> block_moments(const T* z, int n, T eps, T* scratch) {
  T part = 0;
  for (int i = threadIdx.x; i < n; i += kGlueThreads) part += z[i];
  const T mean = block_sum(part, scratch) / n;
  part = 0;
  for (int i = threadIdx.x; i < n; i += kGlueThreads) part += (z[i] - mean) * (z[i] - mean);
  return {mean, op_rsqrt(block_sum(part, scratch) / n + eps)};
}

// The blocks that run one image's glue: `size` blocks of kGlueThreads threads, consecutive in the
// grid's x (blockIdx.x = n size + rank), a thread-block cluster where size > 1 (glue_launch, on
// compute capability 9.0). A block takes its share of each step (rows of a matrix-vector
// product, channels of a sum, elements of a vector); a reduction over a whole vector (a
// LayerNorm's moments, a softmax's maximum) runs in every block, over what all of them wrote,
// after a sync. One block per image is the team of one (and what compute capability 8.x runs).
// Spreading an image over a cluster divides the chain's loads and loops that one block waits on
// in turn (its loops run at the latency of their loads, not at a bandwidth) by up to `size`.
struct Span {
  int begin, end;
};

struct Team {
  int n, rank, size;

  __device__ explicit Team(int blocks)
      : n(static_cast<int>(blockIdx.x) / blocks),
        rank(static_cast<int>(blockIdx.x) % blocks),
        size(blocks) {}

  // this block's share [begin, end) of `count` items (empty for a block past the end)
  __device__ Span share(int count) const {
    const int per = (count + size - 1) / size;
    const int begin = min(rank * per, count);
    return {begin, min(begin + per, count)};
  }
  // body(i) for the items i of this block's share, a thread each
  template <typename Body>
  __device__ void each(int count, Body&& body) const {
    const Span s = share(count);
    for (int i = s.begin + static_cast<int>(threadIdx.x); i < s.end; i += kGlueThreads) body(i);
  }
  // a barrier of the team's threads, their memory accesses ordered across it
  __device__ void sync() const {
    if (size > 1)
      launch::cluster_sync();
    else
      __syncthreads();
  }
  // the same, where the block's own threads are already in step (a reduction's barriers just
  // passed): the other blocks to wait for
  __device__ void sync_blocks() const {
    if (size > 1) launch::cluster_sync();
  }
  // the thread that writes an image's single values
  __device__ bool lead() const { return rank == 0 && threadIdx.x == 0; }
};

// out[r] = sum_k W[r][k] vec[k] (+ bias[r]) for W (R x K), row-major, the rows of the block's
// share: a warp per row, each warp taking kDotRows rows at once so that their loads are in flight
// together (a row's result is stored before the next row's loads, which the compiler then keeps
// behind the store: one row at a time, each a wait on its loads). Every lane of a warp calls it
// (the warps' shuffles).
constexpr int kDotRows = 4;

template <typename T>
__device__ __forceinline__ void rows_dot(const Team& team, const T* W, const T* vec,
                                         const T* bias, int R, int K, T* out) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const Span rows = team.share(R);
  for (int r0 = rows.begin + warp * kDotRows; r0 < rows.end; r0 += kGlueWarps * kDotRows) {
    T acc[kDotRows];
#pragma unroll
    for (int j = 0; j < kDotRows; ++j) acc[j] = 0;
    for (int k = lane; k < K; k += 32) {
      const T v = vec[k];
#pragma unroll
      for (int j = 0; j < kDotRows; ++j)
        if (r0 + j < rows.end) acc[j] += W[static_cast<int64_t>(r0 + j) * K + k] * v;
    }
#pragma unroll
    for (int j = 0; j < kDotRows; ++j) {
      const T sum = warp_sum(acc[j]);
      if (lane == 0 && r0 + j < rows.end)
        out[r0 + j] = bias != nullptr ? sum + bias[r0 + j] : sum;
    }
  }
}

// Dynamic shared memory of a glue kernel, in values of its dtype: block_reduce's kGlueWarps,
// sum_splits' partial sums (kGlueThreads per source, 3 sources at most), then column_sums'
// (kGlueThreads).
constexpr int kGlueColsAt = kGlueWarps + 3 * kGlueThreads;
constexpr int kGlueSmem = kGlueColsAt + kGlueThreads;

// A glue kernel's dynamic shared memory (kGlueSmem values of T).
template <typename T>
__device__ __forceinline__ T* glue_scratch(unsigned char* smem) {
  return reinterpret_cast<T*>(MMATTN_BLOCK_SHARED(smem));
}

// out[k] = sum_r term(r, k) for r < R and the columns k < K of the block's share: a thread per
// column (the threads of a warp take consecutive columns). Up to kGlueThreads / 2 columns in the
// share, G = kGlueThreads / (its columns) groups each take every G-th row and their sums are
// added in group order (the same every run) through column_sums' part of the glue's shared
// memory `scratch` (kGlueSmem values): a thread's walk over the rows, R loads one behind the
// other, is what a glue block waits on. term(r, k) is called once for each (r, k), by one
// thread. Every thread of the block calls it; on return a thread sees the columns it wrote
// (k = the share's first + threadIdx.x + i kGlueThreads, with or without groups).
template <typename T, typename Term>
__device__ __forceinline__ void column_sums(const Team& team, int R, int K, T* scratch,
                                            Term&& term, T* out) {
  const Span cols = team.share(K);
  const int width = cols.end - cols.begin;
  const int G = width > 0 && width <= kGlueThreads / 2 ? kGlueThreads / width : 1;
  if (G == 1) {
    for (int k = cols.begin + threadIdx.x; k < cols.end; k += kGlueThreads) {
      T acc = 0;
      for (int r = 0; r < R; ++r) acc += term(r, k);
      out[k] = acc;
    }
    return;
  }
  T* part = scratch + kGlueColsAt;
  const int g = threadIdx.x / width, k = cols.begin + threadIdx.x % width;
  __syncthreads();  // an earlier call's groups have been added up
  if (g < G) {
    T acc = 0;
    for (int r = g; r < R; r += G) acc += term(r, k);
    part[threadIdx.x] = acc;  // (threadIdx.x = g width + k - cols.begin)
  }
  __syncthreads();
  if (static_cast<int>(threadIdx.x) < width) {
    T acc = 0;
    for (int gg = 0; gg < G; ++gg) acc += part[gg * width + threadIdx.x];
    out[cols.begin + threadIdx.x] = acc;
  }
}

// body(i, load(i)) for i in [begin, end), the block's threads taking consecutive i, kWalkBatch
// loads issued before the first body runs. A glue's element-wise loops otherwise wait on each
// load in turn: the compiler keeps a load behind an earlier store or atomic add that it cannot
// prove apart from it (the SASS of PSA_s's W_v' diag(A) loop: load, convert, store, next load),
// and one block per image has nothing else to run meanwhile.
constexpr int kWalkBatch = 8;

template <typename Load, typename Body>
__device__ __forceinline__ void batched_walk(int64_t begin, int64_t end, Load&& load,
                                             Body&& body) {
  for (int64_t i0 = begin + threadIdx.x; i0 < end; i0 += kWalkBatch * kGlueThreads) {
    decltype(load(0)) v[kWalkBatch];
#pragma unroll
    for (int u = 0; u < kWalkBatch; ++u)
      if (i0 + u * kGlueThreads < end) v[u] = load(i0 + u * kGlueThreads);
#pragma unroll
    for (int u = 0; u < kWalkBatch; ++u)
      if (i0 + u * kGlueThreads < end) body(i0 + u * kGlueThreads, v[u]);
  }
}

// out[k] = sum_r W[r][k] vec[r] for W (R x K), row-major, the columns of the block's share
// (column_sums: every thread calls it).
template <typename T>
__device__ __forceinline__ void cols_dot(const Team& team, const T* W, const T* vec, int R, int K,
                                         T* out, T* scratch) {
  column_sums(team, R, K, scratch,
              [&](int r, int k) { return W[static_cast<int64_t>(r) * K + k] * vec[r]; }, out);
}

// *out = sum_i a[i] b[i] over the `count` values of two vectors the team wrote (a sync
// before): the team's first block sums them (block_sum's order, the same every run), its first
// thread stores.
template <typename T>
__device__ __forceinline__ void lead_dot(const Team& team, const T* a, const T* b, int count,
                                         T* scratch, T* out) {
  if (team.rank != 0) return;  // (the whole block)
  T part = 0;
  for (int i = threadIdx.x; i < count; i += kGlueThreads) part += a[i] * b[i];
  const T sum = block_sum(part, scratch);
  if (threadIdx.x == 0) *out = sum;
}

// The chain of Eq. 1-5 on one image's s and m (see the top of this file); s and m written by
// the team before (a sync), every vector written by it on return (a sync).
template <typename T>
__device__ void run_chain(const Team& team, const Chain<T>& w, int C, T eps, bool sequential,
                          const ChainVecs<T>& o, T* scratch) {
  const int H = C / 2;
  rows_dot(team, w.ch_wv, o.s, w.ch_bv, H, C, o.v);
  team.sync();
  rows_dot(team, w.ch_wz, o.v, w.ch_bz, C, H, o.z);
  team.sync();
  // (normalised into zhat, not in place: other blocks may still be reading z for its moments)
  const Moments<T> ln = block_moments(o.z, C, eps, scratch);
  team.each(C, [&](int c) {
    const T zh = (o.z[c] - ln.mean) * ln.rstd;
    o.zhat[c] = zh;
    o.a[c] = op_sigmoid(w.ln_w[c] * zh + w.ln_b[c]);
    o.mz[c] = sequential ? o.a[c] * o.m[c] : o.m[c];
  });
  if (team.lead()) *o.rstd = ln.rstd;
  team.sync();
  rows_dot(team, w.sp_wq, o.mz, w.sp_bq, H, C, o.g);  // q's logits (likewise not in place)
  team.sync();
  T part = -INFINITY;
  for (int j = threadIdx.x; j < H; j += kGlueThreads) part = op_max(part, o.g[j]);
  const T qmax = block_max(part, scratch);
  part = 0;
  for (int j = threadIdx.x; j < H; j += kGlueThreads) part += op_exp(o.g[j] - qmax);
  const T qsum = block_sum(part, scratch);
  team.each(H, [&](int j) { o.q[j] = op_exp(o.g[j] - qmax) / qsum; });
  team.sync();
  cols_dot(team, w.sp_wv, o.q, H, C, o.u, scratch);
  team.each(C, [&](int c) { o.ueff[c] = sequential ? o.u[c] * o.a[c] : o.u[c]; });
  lead_dot(team, o.q, w.sp_bv, H, scratch, o.c);
  team.sync();
}

// out_j[c] = sum_{s < S} src_j[(n S + s) C + c] for the K (1-3) sources j and the channels c of
// the block's share of image n's C (source 0's terms times weight(s)): the splits' partial sums
// of (N, S, C) tensors added up, visible to the block on return. One loop over the splits serves
// the K sources (their loads in flight together). Up to kGlueThreads / 2 channels in the share,
// G = kGlueThreads / (its channels) groups each take every G-th split and their sums are added
// in group order (the same order every run); otherwise a thread per channel, as the loops it
// replaced. `part`: the glue's shared memory past its first kGlueWarps values.
// (An H200 run of a first version, its groups' loop kept from unrolling and one call per
// source, measured the glues 22-57 % slower, 2026-11-26: these loops are a large part of a
// glue's time.)
template <int K, typename T, typename Weight>
__device__ __forceinline__ void sum_splits(const Team& team, int S, int C, Weight weight,
                                           T* part, const T* src0, T* out0,
                                           const T* src1 = nullptr, T* out1 = nullptr,
                                           const T* src2 = nullptr, T* out2 = nullptr) {
  static_assert(K >= 1 && K <= 3, "sum_splits: 1 to 3 sources");
  const int64_t base = static_cast<int64_t>(team.n) * S * C;
  const Span cs = team.share(C);
  const int width = cs.end - cs.begin;
  const int G = width > 0 && width <= kGlueThreads / 2 ? kGlueThreads / width : 1;
  const int g = G > 1 ? threadIdx.x / width : 0;
  for (int c = cs.begin + (G > 1 ? threadIdx.x % width : threadIdx.x); c < cs.end && g < G;
       c += kGlueThreads) {
    T a0 = 0, a1 = 0, a2 = 0;
    for (int s = g; s < S; s += G) {
      const int64_t i = base + static_cast<int64_t>(s) * C + c;
      a0 += weight(s) * src0[i];
      if (K > 1) a1 += src1[i];
      if (K > 2) a2 += src2[i];
    }
    if (G > 1) {  // (a single pass of the loop, threadIdx.x = g width + c - cs.begin)
      part[threadIdx.x] = a0;
      if (K > 1) part[kGlueThreads + threadIdx.x] = a1;
      if (K > 2) part[2 * kGlueThreads + threadIdx.x] = a2;
    } else {
      out0[c] = a0;
      if (K > 1) out1[c] = a1;
      if (K > 2) out2[c] = a2;
    }
  }
  if (G > 1) {
    __syncthreads();
    if (static_cast<int>(threadIdx.x) < width) {
      const int i = threadIdx.x, c = cs.begin + i;
      T a0 = 0, a1 = 0, a2 = 0;
      for (int gg = 0; gg < G; ++gg) {
        a0 += part[gg * width + i];
        if (K > 1) a1 += part[kGlueThreads + gg * width + i];
        if (K > 2) a2 += part[2 * kGlueThreads + gg * width + i];
      }
      out0[c] = a0;
      if (K > 1) out1[c] = a1;
      if (K > 2) out2[c] = a2;
    }
  }
  __syncthreads();
}

// sum_splits' weight where there is none
struct Unweighted {
  __device__ __forceinline__ int operator()(int) const { return 1; }
};

// Merges image n's S splits of the forward reduction (psa_kernels.cuh, fwd_reduce_kernel):
// s = sum_p pi_p x_p and m = mean_p x_p into s_out and m_out (C each, visible to the team on
// return); returns the softmax's normalisation (the logits' maximum, the sum of exponentials),
// in every block. `scratch`: kGlueSmem values.
template <typename T>
__device__ __forceinline__ SoftmaxNorm<T> merge_splits(const Team& team, const T* pmax,
                                                       const T* psum, const T* ps, const T* pm,
                                                       int S, int C, int P, T* s_out, T* m_out,
                                                       T* scratch) {
  const T* mx = pmax + static_cast<int64_t>(team.n) * S;
  const T* sm = psum + static_cast<int64_t>(team.n) * S;
  T part = -INFINITY;
  for (int s = threadIdx.x; s < S; s += kGlueThreads) part = op_max(part, mx[s]);
  const T top = block_max(part, scratch);
  part = 0;
  for (int s = threadIdx.x; s < S; s += kGlueThreads) part += sm[s] * op_exp(mx[s] - top);
  const T total = block_sum(part, scratch);
  sum_splits<2>(team, S, C, [=](int s) { return op_exp(mx[s] - top); }, scratch + kGlueWarps,
                ps, s_out, pm, m_out);
  team.each(C, [&](int c) {
    s_out[c] /= total;
    m_out[c] /= P;
  });
  team.sync();
  return {top, total};
}

// The merged softmax state of the team's image, in the (2, N) rows [maxima; sums of
// exponentials] (the grid: N teams).
template <typename T>
__device__ __forceinline__ void write_norm(const SoftmaxNorm<T>& norm, const Team& team, T* out) {
  if (team.lead()) {
    out[team.n] = norm.top;
    out[gridDim.x / team.size + team.n] = norm.total;
  }
}

// Workspace per image (the larger, backward layout): zhat, u, A, u_eff, d_a, d_mz, d_zhat
// (C each), d_q (C/2), rstd, c.
__host__ __device__ inline int64_t glue_work(int C) {
  return 7 * static_cast<int64_t>(C) + C / 2 + 2;
}

template <typename T>
__global__ void __launch_bounds__(kGlueThreads, 1)
fwd_glue_kernel(int blocks, const T* __restrict__ pmax, const T* __restrict__ psum,
                const T* __restrict__ ps, const T* __restrict__ pm, int S, int C, int P,
                Chain<T> w, T eps, bool sequential, T* __restrict__ lnorm,
                T* __restrict__ stats, T* __restrict__ cbias, T* __restrict__ work,
                T* __restrict__ a_out, T* __restrict__ ueff_out) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* scratch = glue_scratch<T>(smem_raw);
  const Team team(blocks);
  const int n = team.n, H = C / 2;
  T* st = stats + static_cast<int64_t>(n) * 4 * C;  // rows s, m, A, u_eff
  write_norm(merge_splits(team, pmax, psum, ps, pm, S, C, P, st, st + C, scratch), team, lnorm);
  T* ws = work + static_cast<int64_t>(n) * glue_work(C);
  ChainVecs<T> o;
  o.s = st;
  o.m = st + C;
  o.a = st + 2 * C;
  o.ueff = st + 3 * C;
  o.zhat = ws;
  o.mz = ws + C;
  o.u = ws + 2 * C;
  o.v = ws + 3 * C;
  o.q = ws + 3 * C + H;
  o.rstd = ws + 4 * C;
  o.z = ws + 5 * C;
  o.g = ws + 6 * C;
  o.c = cbias + n;
  run_chain(team, w, C, eps, sequential, o, scratch);  // (ends with a sync: o.a, o.ueff written)
  if (a_out != nullptr) {  // A and u_eff also as dense (N, C) rows, for the apply pass
    team.each(C, [&](int c) {
      a_out[static_cast<int64_t>(n) * C + c] = o.a[c];
      ueff_out[static_cast<int64_t>(n) * C + c] = o.ueff[c];
    });
  }
}

// In: the backward reduction's splits' partial sums of d_t (N, S), dA and d u_eff (N, S, C);
// the forward's stats. Outputs per image n: dm = dL/dm / P, dsv = dL/ds (N, C), beta (N); the
// weight-gradient
// factors left (4, N, C/2) = [q, d_g, v, d_v] and right (4, N, C) = [d_u, mz, d_z, s]; the
// vector gradients' terms vecs (N, 3 C/2 + 3 C) = [q d_c, d_g, d_v, d_ln zhat, d_ln, d_z], or,
// with vec_sum given, their sum over the images added into vec_sum (3 C/2 + 3 C, zeroed
// before; atomic adds) and vecs unused.
template <typename T>
__global__ void __launch_bounds__(kGlueThreads, 1)
bwd_glue_kernel(int blocks, const T* __restrict__ part_dt, const T* __restrict__ part_da,
                const T* __restrict__ part_dueff, const T* __restrict__ stats, int N, int S,
                int C, int P, Chain<T> w, T eps, bool sequential, T* __restrict__ dm,
                T* __restrict__ dsv, T* __restrict__ beta, T* __restrict__ left,
                T* __restrict__ right, T* __restrict__ vecs, T* __restrict__ work,
                T* __restrict__ vec_sum) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* scratch = glue_scratch<T>(smem_raw);
  const Team team(blocks);
  const int n = team.n, H = C / 2;
  const T* st = stats + static_cast<int64_t>(n) * 4 * C;
  T* ws = work + static_cast<int64_t>(n) * glue_work(C);
  auto L = [&](int k) { return left + (static_cast<int64_t>(k) * N + n) * H; };
  auto R = [&](int k) { return right + (static_cast<int64_t>(k) * N + n) * C; };
  T* vn = vec_sum != nullptr ? nullptr : vecs + static_cast<int64_t>(n) * (3 * H + 3 * C);
  auto put = [&](int i, T v) {  // term i of the vector gradients
    if (vn != nullptr)
      vn[i] = v;
    else
      atomicAdd(vec_sum + i, v);
  };
  T *d_a = ws + 4 * C, *d_mz = ws + 5 * C, *d_zhat = ws + 6 * C, *d_q = ws + 7 * C;
  ChainVecs<T> o;
  o.s = st;
  o.m = st + C;
  o.zhat = ws;
  o.u = ws + C;
  o.a = ws + 2 * C;
  o.ueff = ws + 3 * C;
  o.mz = R(1);
  o.v = L(2);
  o.q = L(0);
  o.rstd = ws + 7 * C + H;
  o.c = o.rstd + 1;
  o.z = d_zhat;  // (d_zhat and d_a are written after the chain)
  o.g = d_a;
  run_chain(team, w, C, eps, sequential, o, scratch);

  // y = x (A (+) S) with S_p = sigmoid(u_eff . x_p + c): the partial sums of the backward
  // reduce pass give dA and d u_eff; d c = sum_p d_t
  T* d_u = R(0);
  sum_splits<2>(team, S, C, Unweighted{}, scratch + kGlueWarps, part_da, d_a, part_dueff, d_u);
  team.each(C, [&](int c) {
    const T da = d_a[c], due = d_u[c];
    d_u[c] = sequential ? due * o.a[c] : due;
    d_a[c] = sequential ? da + due * o.u[c] : da;
    R(3)[c] = o.s[c];
  });
  const T d_c = sum_split_values(part_dt, n, S, scratch);
  team.sync();  // (d_u written)
  // u = W_v'^T q, c = q . b_v', q = softmax(g): d_q = W_v' d_u + d_c b_v', d_g = q (d_q - q.d_q)
  rows_dot(team, w.sp_wv, d_u, static_cast<const T*>(nullptr), H, C, d_q);  // W_v' d_u
  team.sync();
  T part = 0;
  for (int j = threadIdx.x; j < H; j += kGlueThreads)
    part += o.q[j] * (d_q[j] + d_c * w.sp_bv[j]);
  const T qdq = block_sum(part, scratch);
  T* d_g = L(1);
  team.each(H, [&](int j) {
    d_g[j] = o.q[j] * (d_q[j] + d_c * w.sp_bv[j] - qdq);
    put(j, o.q[j] * d_c);
    put(H + j, d_g[j]);
  });
  team.sync();
  // g = W_q' mz + b_q': d_mz = W_q'^T d_g; mz = A m | m
  cols_dot(team, w.sp_wq, d_g, H, C, d_mz, scratch);
  team.each(C, [&](int c) {  // the columns this thread just wrote
    const T a = o.a[c];
    const T da = sequential ? d_a[c] + d_mz[c] * o.m[c] : d_a[c];
    dm[static_cast<int64_t>(n) * C + c] = (sequential ? d_mz[c] * a : d_mz[c]) / P;
    // A = sigmoid(LN(z)): d_ln = dA A (1 - A), d_zhat = d_ln ln_w
    const T d_ln = da * a * (T(1) - a);
    put(3 * H + c, d_ln * o.zhat[c]);
    put(3 * H + C + c, d_ln);
    d_zhat[c] = d_ln * w.ln_w[c];
  });
  team.sync();
  T part1 = 0, part2 = 0;
  for (int c = threadIdx.x; c < C; c += kGlueThreads) {
    part1 += d_zhat[c];
    part2 += d_zhat[c] * o.zhat[c];
  }
  const T mean1 = block_sum(part1, scratch) / C;
  const T mean2 = block_sum(part2, scratch) / C;
  const T rstd = *o.rstd;
  T* d_z = R(2);
  team.each(C, [&](int c) {
    d_z[c] = rstd * (d_zhat[c] - mean1 - o.zhat[c] * mean2);
    put(3 * H + 2 * C + c, d_z[c]);
  });
  team.sync();
  // z = W_z v + b_z, v = W_v s + b_v: d_v = W_z^T d_z, ds = W_v^T d_v
  T* d_v = L(3);
  cols_dot(team, w.ch_wz, d_z, C, H, d_v, scratch);
  team.each(H, [&](int j) { put(2 * H + j, d_v[j]); });
  team.sync();
  T* dsn = dsv + static_cast<int64_t>(n) * C;
  cols_dot(team, w.ch_wv, d_v, H, C, dsn, scratch);
  team.sync();
  lead_dot(team, dsn, o.s, C, scratch, beta + n);
}

// ---------------------------------------------------------------- host side
// MMATTN_PSA_GLUE_BLOCKS: the blocks per image of the glue kernels (a cluster's size, 1 to
// kMaxClusterBlocks), or unset / empty for glue_blocks' choice. A knob to measure with (1: one
// block per image, the glues before clusters).
inline int glue_blocks_from_env() {
  const auto describe = [] {
    return c10::str("an integer from 1 to ", launch::kMaxClusterBlocks,
                    " (the glue kernels' blocks per image)");
  };
  return static_cast<int>(
      env_integer("MMATTN_PSA_GLUE_BLOCKS", 1, launch::kMaxClusterBlocks, 0, describe));
}

// How many blocks run one image's glue (Team): the environment's count, or as many as keep the
// N images' teams within the multiprocessors (a glue block fills one: 512 threads of up to 128
// registers), with at least 32 of the C channels each and at most kMaxClusterBlocks; then the
// largest cluster up to that which the device runs (1 below compute capability 9.0).
template <typename... KArgs>
int glue_blocks(void (*kernel)(KArgs...), int64_t N, int64_t C, size_t smem) {
  int64_t wanted = glue_blocks_from_env();
  if (wanted == 0) {
    const int64_t sms = launch::device_attribute(launch::Attr::kMultiProcessors);
    wanted = std::min<int64_t>({sms / std::max<int64_t>(N, 1), C / 32,
                                static_cast<int64_t>(launch::kMaxClusterBlocks)});
  }
  return launch::cluster_blocks(kernel, static_cast<int>(std::max<int64_t>(wanted, 1)),
                                kGlueThreads, smem);
}

// kernel(blocks, args...) for the N images, a team of `blocks` (glue_blocks) each: a grid of
// N blocks teams, in clusters of `blocks`; `value_bytes`: the size of the kernel's
// accumulation dtype (its shared memory is kGlueSmem of them).
template <typename... KArgs, typename... Args>
void glue_launch(void (*kernel)(int, KArgs...), int64_t N, int64_t C, size_t value_bytes,
                 Args&&... args) {
  const size_t smem = kGlueSmem * value_bytes;
  const int blocks = glue_blocks(kernel, N, C, smem);
  launch::launch_clusters(kernel, dim3(static_cast<unsigned>(N * blocks)),
                          static_cast<unsigned>(blocks), kGlueThreads, smem, blocks,
                          std::forward<Args>(args)...);
}

// `t`, checked: shape, the accumulation dtype `acc` (float or double) and x's device; contiguous.
at::Tensor acc_tensor(const at::Tensor& t, at::IntArrayRef shape, at::ScalarType acc,
                      const at::Device& device, const char* name) {
  TORCH_CHECK(t.sizes() == shape, "mmattn psa glue: ", name, " must have shape ", shape,
              ", got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == acc && t.device() == device, "mmattn psa glue: ", name,
              " must be ", acc, " on ", device, ", got ", t.scalar_type(), " on ", t.device());
  return t.contiguous();
}

// The chain's weights (CHAIN_NAMES), checked and made contiguous; `keep` holds them.
template <typename T>
Chain<T> chain_weights(at::TensorList weights, int C, at::ScalarType acc, const at::Device& dev,
                       std::vector<at::Tensor>* keep) {
  TORCH_CHECK(weights.size() == 10, "mmattn psa glue: expected the 10 chain weights, got ",
              weights.size());
  const int64_t H = C / 2;
  const std::vector<std::vector<int64_t>> shapes{{H, C}, {H}, {C, H}, {C}, {C}, {C},
                                                 {H, C}, {H}, {H, C}, {H}};
  const char* names[] = {"ch_wv", "ch_bv", "ch_wz", "ch_bz", "ln_weight", "ln_bias",
                         "sp_wq", "sp_bq", "sp_wv", "sp_bv"};
  for (size_t i = 0; i < 10; ++i)
    keep->push_back(acc_tensor(weights[i], shapes[i], acc, dev, names[i]));
  const auto& k = *keep;
  return {k[0].data_ptr<T>(), k[1].data_ptr<T>(), k[2].data_ptr<T>(), k[3].data_ptr<T>(),
          k[4].data_ptr<T>(), k[5].data_ptr<T>(), k[6].data_ptr<T>(), k[7].data_ptr<T>(),
          k[8].data_ptr<T>(), k[9].data_ptr<T>()};
}

// The sizes of a glue call, from its (N, S) and (N, S, C) inputs (checked) and its pixel count:
// the images, pixels, splits, channels, and the accumulation dtype and device everything else
// must have.
struct GlueSizes {
  int64_t N, P, S, C;
  at::ScalarType acc;
  at::Device dev;
};

GlueSizes glue_sizes(const at::Tensor& per_split, const at::Tensor& partial, int64_t pixels,
                     const char* ps_name, const char* partial_name) {
  TORCH_CHECK(per_split.dim() == 2 && partial.dim() == 3, "mmattn psa glue: ", ps_name,
              " must be (N, S) and ", partial_name, " (N, S, C), got ", per_split.sizes(),
              " and ", partial.sizes());
  const GlueSizes z{partial.size(0), pixels, partial.size(1), partial.size(2),
                    per_split.scalar_type(), per_split.device()};
  TORCH_CHECK(z.C % 2 == 0, "mmattn psa glue: C must be even, got C=", z.C);
  TORCH_CHECK(z.P > 0 && z.P < (int64_t(1) << 31),
              "mmattn psa glue: pixels must be in [1, 2^31), got ", z.P);
  TORCH_CHECK(z.acc == at::kFloat || z.acc == at::kDouble,
              "mmattn psa glue: the accumulation dtype must be float32 or float64, got ", z.acc);
  return z;
}

// lnorm (2, N) (the merged state of the softmax over the P pixels' logits: the maxima, the sums
// of exponentials), stats (N, 4, C) = [s, m, A, u_eff] and c; with a_out and ueff_out given
// ((N, C), the accumulation dtype, contiguous), A and u_eff also written there.
std::tuple<at::Tensor, at::Tensor, at::Tensor> fwd_glue(
    const at::Tensor& pmax_in, const at::Tensor& psum_in, const at::Tensor& ps_in,
    const at::Tensor& pm_in, int64_t pixels, at::TensorList weights, double eps,
    bool sequential, const at::Tensor& a_out = at::Tensor(),
    const at::Tensor& ueff_out = at::Tensor()) {
  const launch::DeviceGuard guard(pmax_in.device());
  const GlueSizes z = glue_sizes(pmax_in, ps_in, pixels, "pmax", "ps");
  const int64_t N = z.N, P = z.P, S = z.S, C = z.C;
  const at::ScalarType acc = z.acc;
  const at::Device dev = z.dev;
  const at::Tensor pmax = acc_tensor(pmax_in, {N, S}, acc, dev, "pmax");
  const at::Tensor psum = acc_tensor(psum_in, {N, S}, acc, dev, "psum");
  const at::Tensor ps = acc_tensor(ps_in, {N, S, C}, acc, dev, "ps");
  const at::Tensor pm = acc_tensor(pm_in, {N, S, C}, acc, dev, "pm");
  const auto opts = pmax.options();
  at::Tensor lnorm = at::empty({2, N}, opts), stats = at::empty({N, 4, C}, opts);
  at::Tensor cbias = at::empty({N}, opts);
  const bool rows = a_out.defined();
  if (rows)
    TORCH_CHECK(ueff_out.defined() &&
                    acc_tensor(a_out, {N, C}, acc, dev, "a_out").is_same(a_out) &&
                    acc_tensor(ueff_out, {N, C}, acc, dev, "ueff_out").is_same(ueff_out),
                "mmattn psa glue: a_out and ueff_out must both be given, contiguous");
  if (N == 0) return {lnorm, stats, cbias};
  at::Tensor work = at::empty({N, glue_work(static_cast<int>(C))}, opts);
  MMATTN_PSA_DISPATCH_ACC(acc, "psa_fwd_glue", [&] {
    std::vector<at::Tensor> keep;
    const Chain<scalar_t> w = chain_weights<scalar_t>(weights, static_cast<int>(C), acc, dev,
                                                      &keep);
    glue_launch(fwd_glue_kernel<scalar_t>, N, C, sizeof(scalar_t), pmax.data_ptr<scalar_t>(),
                psum.data_ptr<scalar_t>(), ps.data_ptr<scalar_t>(), pm.data_ptr<scalar_t>(),
                static_cast<int>(S), static_cast<int>(C), static_cast<int>(P), w,
                static_cast<scalar_t>(eps), sequential, lnorm.data_ptr<scalar_t>(),
                stats.data_ptr<scalar_t>(), cbias.data_ptr<scalar_t>(),
                work.data_ptr<scalar_t>(), rows ? a_out.data_ptr<scalar_t>() : nullptr,
                rows ? ueff_out.data_ptr<scalar_t>() : nullptr);
  });
  return {lnorm, stats, cbias};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> psa_fwd_glue_cuda(
    const at::Tensor& pmax, const at::Tensor& psum, const at::Tensor& ps, const at::Tensor& pm,
    int64_t pixels, at::TensorList weights, double eps, bool sequential) {
  return fwd_glue(pmax, psum, ps, pm, pixels, weights, eps, sequential);
}

// dm, dsv, beta, left, right and vecs (bwd_glue_kernel); with vec_sum given (3 C/2 + 3 C
// values, the accumulation dtype, contiguous, zeroed before by the same stream), vecs' sum over
// the images added into it, and vecs undefined.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
bwd_glue(const at::Tensor& part_dt_in, const at::Tensor& part_da_in,
         const at::Tensor& part_dueff_in, const at::Tensor& stats_in, int64_t pixels,
         at::TensorList weights, double eps, bool sequential,
         const at::Tensor& vec_sum = at::Tensor()) {
  const launch::DeviceGuard guard(part_dt_in.device());
  const GlueSizes z = glue_sizes(part_dt_in, part_da_in, pixels, "part_dt", "part_da");
  const int64_t N = z.N, P = z.P, S = z.S, C = z.C, H = C / 2;
  const at::ScalarType acc = z.acc;
  const at::Device dev = z.dev;
  const at::Tensor part_dt = acc_tensor(part_dt_in, {N, S}, acc, dev, "part_dt");
  const at::Tensor part_da = acc_tensor(part_da_in, {N, S, C}, acc, dev, "part_da");
  const at::Tensor part_dueff = acc_tensor(part_dueff_in, {N, S, C}, acc, dev, "part_dueff");
  const at::Tensor stats = acc_tensor(stats_in, {N, 4, C}, acc, dev, "stats");
  const auto opts = part_dt.options();
  at::Tensor dm = at::empty({N, C}, opts), dsv = at::empty({N, C}, opts);
  at::Tensor beta = at::empty({N}, opts);
  at::Tensor left = at::empty({4, N, H}, opts), right = at::empty({4, N, C}, opts);
  const bool summed = vec_sum.defined();
  TORCH_CHECK(!summed || acc_tensor(vec_sum, {3 * H + 3 * C}, acc, dev, "vec_sum").is_same(vec_sum),
              "mmattn psa glue: vec_sum must be contiguous");
  at::Tensor vecs = summed ? at::Tensor() : at::empty({N, 3 * H + 3 * C}, opts);
  if (N == 0) return {dm, dsv, beta, left, right, vecs};
  at::Tensor work = at::empty({N, glue_work(static_cast<int>(C))}, opts);
  MMATTN_PSA_DISPATCH_ACC(acc, "psa_bwd_glue", [&] {
    std::vector<at::Tensor> keep;
    const Chain<scalar_t> w = chain_weights<scalar_t>(weights, static_cast<int>(C), acc, dev,
                                                      &keep);
    glue_launch(bwd_glue_kernel<scalar_t>, N, C, sizeof(scalar_t), part_dt.data_ptr<scalar_t>(),
                part_da.data_ptr<scalar_t>(), part_dueff.data_ptr<scalar_t>(),
                stats.data_ptr<scalar_t>(), static_cast<int>(N), static_cast<int>(S),
                static_cast<int>(C), static_cast<int>(P), w, static_cast<scalar_t>(eps),
                sequential, dm.data_ptr<scalar_t>(), dsv.data_ptr<scalar_t>(),
                beta.data_ptr<scalar_t>(), left.data_ptr<scalar_t>(),
                right.data_ptr<scalar_t>(), summed ? nullptr : vecs.data_ptr<scalar_t>(),
                work.data_ptr<scalar_t>(), summed ? vec_sum.data_ptr<scalar_t>() : nullptr);
  });
  return {dm, dsv, beta, left, right, vecs};
}

// ---------------------------------------------------------------- the weight matrices' gradients
// sum_n l[n ls] r[n rs] over the N images, in image order (r null: sum_n l[n ls]): a value of
// a weight's gradient, a sum over the images.
template <typename T>
__device__ __forceinline__ T image_sum(const T* l, int64_t ls, const T* r, int64_t rs, int N) {
  T acc = 0;
  for (int64_t n = 0; n < N; ++n) acc += r != nullptr ? l[n * ls] * r[n * rs] : l[n * ls];
  return acc;
}

// The four (C/2 x C) weight matrices' gradients of the paper form and PSA_p, each a sum over the
// images of an outer product, sum_n l_n r_n^T, from the backward glue's left (4, N, H) and right
// (4, N, C): a thread per element, a loop over the N images (N is the batch: a few multiply-adds
// a thread), as the backward apply pass's tail (psa_kernels.cuh: the same launch). Matrix
// `transposed` (the 1x1 convolution from C/2 to C channels, whose weight is C x H) is written
// as its transpose, so that every gradient leaves in its weight's layout: cuBLAS's batched
// product (the same for all four) left that one as a transposed view, which autograd's gradient
// accumulation then copied into the weight's layout, a launch more.
template <typename T>
struct OuterSums {
  const T *left, *right;
  int N, H, C, transposed;
  T* out;

  __device__ void operator()(int block, int blocks) const {
    const int64_t per = static_cast<int64_t>(H) * C;
    for (int64_t idx = static_cast<int64_t>(block) * kThreads + threadIdx.x; idx < 4 * per;
         idx += static_cast<int64_t>(blocks) * kThreads) {
      const int m = static_cast<int>(idx / per);
      const int64_t e = idx - m * per;
      // consecutive threads: consecutive columns of r (or, transposed, rows of l); the other
      // factor is one value for the warp
      const bool t = m == transposed;
      const int i = static_cast<int>(t ? e % H : e / C), j = static_cast<int>(t ? e / H : e % C);
      out[idx] = image_sum(left + static_cast<int64_t>(m) * N * H + i, H,
                           right + static_cast<int64_t>(m) * N * C + j, C, N);
    }
  }
};

// bwd_apply's tail maker for the four sums into `out` (4, H, C) (matrix `transposed` laid out
// C x H in it: view it as such), from left and right in the accumulation dtype.
struct OuterSumsTail {
  const at::Tensor &left, &right, &out;
  int transposed;

  template <typename S>
  OuterSums<at::opmath_type<S>> operator()(S*) const {
    using T = at::opmath_type<S>;
    return {left.data_ptr<T>(), right.data_ptr<T>(), static_cast<int>(left.size(1)),
            static_cast<int>(left.size(2)), static_cast<int>(right.size(2)), transposed,
            out.data_ptr<T>()};
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
psa_bwd_glue_cuda(const at::Tensor& part_dt, const at::Tensor& part_da,
                  const at::Tensor& part_dueff, const at::Tensor& stats, int64_t pixels,
                  at::TensorList weights, double eps, bool sequential) {
  return bwd_glue(part_dt, part_da, part_dueff, stats, pixels, weights, eps, sequential);
}

}  // namespace MMATTN_PSA_UNIT
}  // namespace psa
}  // namespace mmattn
